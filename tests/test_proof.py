"""The curriculum proof, shortened: configs/proof.yaml compressed into a few hundred steps on the
tiny built-in corpus still teaches the router in the forced phase, so that in the teacher phase
(learned routing plus the teacher loss) most tokens already go to their domain's expert."""

import pytest

PROOF_STEPS = 260


@pytest.mark.slow
@pytest.mark.integration
def test_the_forced_phase_teaches_the_router(tmp_path, builtin_cache, ray_session):
    from hydra_ray.analysis.report import analyze
    from hydra_ray.config import load_config, parse_config
    from hydra_ray.data.pipeline import prepare_data
    from hydra_ray.train.curriculum import compressed
    from hydra_ray.train.loop import run_local

    data = load_config("configs/proof.yaml").model_dump(mode="python")
    data["data"].update(builtin_size="tiny", cache_dir=builtin_cache)
    data["train"].update(log_every=4, eval_every=10_000, save_every=10_000)
    cfg = compressed(parse_config(data), PROOF_STEPS)
    run_dir = tmp_path / "proof"
    run_dir.mkdir()
    run_local(cfg, str(run_dir), prepare_data(cfg, log=lambda *_: None))
    s = analyze([str(run_dir)], str(tmp_path / "report"), plots=False)
    by_mode = s["agreement"]["by_routing_mode"]
    chance = 1 / cfg.model.moe.num_experts
    assert by_mode["forced"]["mean"] == pytest.approx(1.0)  # forced routing is the map itself
    assert by_mode["learned"]["mean"] < 0.5  # before the forced phase the router ignores domains ...
    assert by_mode["teacher"]["mean"] > 2 * chance  # ... after it, most tokens go to their domain's expert
    rows = {r["claim"]: r for r in s["verdict"]}
    assert rows["lossless switch-ons: CE cost on the same batch"]["status"] == "pass"
