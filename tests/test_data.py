"""The data pipeline: built-in corpus, readers and bad records, tokenizers, the Ray Data mixture
(realised mix, determinism, resume), labels, and two Ray Train workers reading disjoint slices.

Over 400 lines: the module-scoped prepared data is shared by the mixture, resume and worker tests,
which would otherwise each prepare their own."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hydra_ray.config import parse_config
from hydra_ray.data import builtin
from hydra_ray.data.corpus import CorpusError, list_corpus
from hydra_ray.data.packing import IGNORE, inputs_and_labels, pack
from hydra_ray.data.pipeline import prepare_data
from hydra_ray.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

DOMAINS = ["math", "code", "chat", "finefineweb"]


def _cfg(cache, phases=None, **data):
    phases = phases or [{"name": "all", "until_step": 40}]
    return parse_config({
        "model": {"vocab_size": 264, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "n_blocks": 1, "seq_len": 64},
        "curriculum": {"phases": phases},
        "train": {"seed": 3},
        "data": {"cache_dir": cache, **data},
    })


def _rows(prep, cfg, global_batch: int, start_step: int = 0, end_step: int | None = None):
    """Rows [start_step * G, end_step * G) of the run's order, as one worker of one reads them."""
    from hydra_ray.data.reader import RankReader

    end_step = cfg.curriculum.total_steps if end_step is None else end_step
    reader = RankReader(prep, cfg, global_batch, 0, 1, start_step, end_step)
    batches = [b for _, b in reader]
    reader.close()
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# --------------------------------------------------------------------------- built-in corpus
@pytest.mark.slow
def test_prepare_writes_the_same_bytes_twice_with_dozens_of_documents_per_domain(tmp_path):
    script = Path(sys.executable).parent / "hydra-ray"
    for out in ("a", "b"):
        r = subprocess.run([str(script), "data", "prepare", "--out", str(tmp_path / out), "--size", "tiny", "--quiet"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "4 domains" in r.stdout and "documents" in r.stdout
    for domain in DOMAINS:
        a = sorted((tmp_path / "a" / domain).glob("*.parquet"))
        b = sorted((tmp_path / "b" / domain).glob("*.parquet"))
        assert a and [p.name for p in a] == [p.name for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
        import pyarrow.parquet as pq

        table = pq.read_table(a[0])
        assert table.column_names == ["text", "domain"]
        assert table.num_rows >= 36 and set(table.column("domain").to_pylist()) == {domain}
    assert builtin.documents("math", "tiny", 1) != builtin.documents("math", "tiny", 2)


# --------------------------------------------------------------------------- readers
def _user_corpus(root: Path):
    (root / "math").mkdir(parents=True)
    (root / "code").mkdir()
    (root / "chat").mkdir()
    (root / "finefineweb").mkdir()
    (root / "stray").mkdir()  # names no configured domain: ignored
    lines = [json.dumps({"text": f"problem {i}: {i} + {i} = {2 * i}"}) for i in range(30)]
    lines += ["{not json", json.dumps({"text": ""}), json.dumps({"text": "x", "domain": "klingon"}),
              json.dumps(["a list"]), json.dumps({"no_text": 1})]
    (root / "math" / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    (root / "code" / "a.jsonl").write_text("\n".join(json.dumps({"text": f"def f{i}(): return {i}", "domain": "code"})
                                                      for i in range(20)))
    (root / "code" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"User: hi {i}\nAssistant: hello {i}" for i in range(12)] + [None]}),
                   root / "chat" / "c.parquet")
    (root / "finefineweb" / "w.jsonl").write_text("\n".join(json.dumps({"text": f"Prose paragraph number {i}. " * 5})
                                                            for i in range(15)))


def test_bad_records_are_counted_never_fatal(tmp_path, ray_session, builtin_cache):
    root = tmp_path / "corpus"
    _user_corpus(root)
    prep = prepare_data(_cfg(builtin_cache, corpus=str(root)), log=lambda *_: None)
    bad = {d: prep.stats[d]["bad"] for d in DOMAINS}
    assert {r: n for r, n in bad["math"].items() if n} == {"malformed": 2, "empty_text": 1, "unknown_domain": 1,
                                                           "missing_text": 1}
    assert bad["code"]["unreadable_file"] == 1
    assert bad["chat"]["missing_text"] == 1  # a null text in a Parquet shard
    assert prep.stats["math"]["documents"] == 30 and prep.stats["chat"]["documents"] == 12
    assert "malformed" in prep.report() and all(prep.counts[64][d]["train"] > 0 for d in DOMAINS)


def test_a_domain_with_no_data_is_an_error_before_any_work(tmp_path, builtin_cache):
    root = tmp_path / "corpus"
    (root / "math").mkdir(parents=True)
    (root / "math" / "a.jsonl").write_text(json.dumps({"text": "1 + 1 = 2"}))
    with pytest.raises(CorpusError, match="no data for domain\\(s\\) code, chat, finefineweb"):
        list_corpus(str(root), DOMAINS)
    # weight 0 for the missing domains: only math is required
    cfg = _cfg(builtin_cache, corpus=str(root), mixture={"math": 1.0})
    from hydra_ray.data.pipeline import required_domains

    assert required_domains(cfg) == ["math"]
    with pytest.raises(CorpusError, match="not a folder"):
        list_corpus(str(root / "math" / "a.jsonl"), DOMAINS)


# --------------------------------------------------------------------------- tokenizers and labels
def test_byte_tokenizer_round_trips_and_bpe_trains(tmp_path):
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    assert tok.decode(tok.encode_batch([text])[0]) == text
    docs = builtin.documents("code", "tiny", 0)[:10]
    bpe = train_bpe(iter(docs), 320, tmp_path / "tok" / "tokenizer.json")
    assert bpe.vocab_size == 320 and bpe.pad_id != bpe.eos_id
    ids = bpe.encode_batch([docs[0][:500]])[0]
    assert bpe.decode(ids) == docs[0][:500] and len(ids) < 500  # merges happened
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).vocab_size == 320
    # each token's own bytes (what logprobs show): they join to the text's, characters split or not
    multi = "été à la fenêtre — 3 € ≥ 2, 日本語"
    for t in (tok, bpe):
        ids = t.encode_batch([multi])[0]
        assert b"".join(t.token_bytes(i) for i in ids) == multi.encode("utf-8")
        assert t.token_bytes(t.eos_id) == t.token_bytes(t.pad_id) == b""
    assert any(len(tok.token_bytes(i)) == 1 and i >= 128 for i in tok.encode_batch([multi])[0])
    with pytest.raises(ValueError, match="expected 'byte' or the path"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_packing_masks_padding_and_document_boundaries():
    eos, pad = 256, 257
    windows = pack([np.array([1, 2, 3]), np.array([4, 5])], seq_len=4, eos=eos, pad=pad)
    assert windows.tolist() == [[1, 2, 3, eos, 4], [5, eos, pad, pad, pad]]
    x, y = inputs_and_labels(windows, eos, pad)
    assert y.tolist() == [[2, 3, eos, IGNORE], [eos, IGNORE, IGNORE, IGNORE]]
    assert x.tolist() == [[1, 2, 3, eos], [5, eos, pad, pad]]


# --------------------------------------------------------------------------- the mixture on Ray Data
@pytest.fixture(scope="module")
def tiny_prepared(ray_session, builtin_cache):
    cfg = _cfg(builtin_cache)
    return cfg, prepare_data(cfg, log=lambda *_: None)


@pytest.mark.integration
def test_realised_mixture_is_within_one_point_for_three_weightings(ray_session, builtin_cache, tiny_prepared):
    weightings = [{"math": 1, "code": 1, "chat": 1, "finefineweb": 1},
                  {"math": 0.2, "code": 0.3, "chat": 0.2, "finefineweb": 0.3},
                  {"math": 0.7, "code": 0.05, "chat": 0.05, "finefineweb": 0.2}]
    phases = [{"name": f"p{i}", "until_step": 100 * (i + 1), "mixture": w} for i, w in enumerate(weightings)]
    cfg = _cfg(builtin_cache, phases)
    _, prep = tiny_prepared
    rows = _rows(prep, cfg, global_batch=100)  # 10k sequences per phase
    for i, w in enumerate(weightings):
        dom = rows["domain"][rows["step"] // 100 == i]
        assert len(dom) == 10_000
        got = np.bincount(dom, minlength=4) / len(dom)
        want = np.array([w[d] for d in DOMAINS]) / sum(w.values())
        assert np.abs(got - want).max() < 0.01, (i, got, want)


@pytest.mark.integration
def test_order_is_a_function_of_seed_and_resume_position(ray_session, builtin_cache, tiny_prepared):
    cfg, prep = tiny_prepared
    full = _rows(prep, cfg, global_batch=8)
    again = _rows(prep, cfg, global_batch=8)
    assert all(np.array_equal(full[k], again[k]) for k in full)
    reseeded = parse_config({**cfg.model_dump(mode="python"), "train": {"seed": 4}})
    other = _rows(prep, reseeded, global_batch=8)
    assert not np.array_equal(full["input_ids"], other["input_ids"])  # unlocked phase: seed from train.seed
    resumed = _rows(prep, cfg, global_batch=8, start_step=17)
    assert np.array_equal(resumed["input_ids"], full["input_ids"][17 * 8 :])
    assert np.array_equal(resumed["step"], full["step"][17 * 8 :]) and resumed["step"][0] == 17
    # no padding and no cross-document target ever reaches the loss
    x, y = full["input_ids"], full["labels"]
    assert np.all(y[x == prep.eos_id] == IGNORE) and np.all(y[x == prep.pad_id] == IGNORE)
    assert not np.any(y == prep.pad_id)
    # every kept label is the next input token (the last position's target is the window's end)
    assert np.all((y == IGNORE) | (y == np.roll(x, -1, axis=1)) | (np.arange(y.shape[1]) == y.shape[1] - 1))


@pytest.mark.integration
def test_workers_read_disjoint_slices_of_every_batch_whatever_their_number(tiny_prepared):
    """Each rank reads only its own rows (data/reader.py): together they cover every global batch
    exactly once, in slot order, for 1, 2 and 4 workers, from any start step."""
    from hydra_ray.data.reader import RankReader

    cfg, prep = tiny_prepared
    whole = _rows(prep, cfg, global_batch=8, start_step=0, end_step=6)
    for world in (2, 4):
        for start in (0, 3):
            readers = [RankReader(prep, cfg, 8, r, world, start, 6) for r in range(world)]
            per_rank = [list(rd) for rd in readers]
            for rd in readers:
                rd.close()
            for i, step in enumerate(range(start, 6)):
                parts = [batches[i][1] for batches in per_rank]
                assert all(batches[i][0] == step for batches in per_rank)
                assert [int(k) for b in parts for k in b["slot"]] == list(range(8))
                assert all(b["input_ids"].shape == (8 // world, 64) for b in parts)
                got = np.concatenate([b["input_ids"] for b in parts])
                assert np.array_equal(got, whole["input_ids"][step * 8:(step + 1) * 8]), (world, start, step)


@pytest.mark.integration
def test_data_benchmark_reports_pipeline_against_training_throughput(ray_session, builtin_cache, monkeypatch):
    from hydra_ray.benchmarks import data

    monkeypatch.setattr(data, "load_config", lambda name: _cfg(builtin_cache))
    res = data.run(config="test", steps=3, train_steps=1, log=lambda *_: None)
    assert res["data_tokens"] == 3 * 8 * 64
    assert res["data_vs_train"] > 0


def test_files_that_are_not_shards_are_named_in_a_warning(tmp_path, caplog):
    root = tmp_path / "corpus"
    _user_corpus(root)
    (root / "math" / "notes.txt").write_text("x")
    (root / "math" / "part-1.jsonl.bz2").write_bytes(b"x")
    (root / "math" / "_SUCCESS").write_text("")  # writer markers are skipped quietly
    (root / "chat" / "c.parquet").unlink()
    (root / "chat" / "c.csv").write_text("text\nhello")
    with caplog.at_level("WARNING", logger="hydra_ray.data.corpus"):
        files = list_corpus(str(root), DOMAINS, required=["math"])
    assert [Path(f.path).name for f in files["math"]] == ["part-0.jsonl"]
    assert "ignoring 2 file(s)" in caplog.text and "notes.txt" in caplog.text and "_SUCCESS" not in caplog.text
    with pytest.raises(CorpusError, match=r"no data for domain\(s\) chat .*chat/ holds only c\.csv"):
        list_corpus(str(root), DOMAINS)


def test_corpus_reads_through_a_filesystem_uri(tmp_path):
    root = tmp_path / "corpus"
    _user_corpus(root)
    files = list_corpus(f"file://{root}", DOMAINS)
    from hydra_ray.data.corpus import read_records

    recs = [r for f in files["finefineweb"] for r in read_records(f, set(DOMAINS))]
    assert len(recs) == 15 and all(r["error"] == "" for r in recs)


# --------------------------------------------------------------------------- a newcomer's own corpus
def _docs(domain: str, n: int, start: int = 0) -> list[str]:
    words = {"math": "sum prime root", "code": "def return yield", "chat": "User: hi Assistant: hello",
             "finefineweb": "river town market"}[domain].split()
    return [f"{domain} document {i}: " + " ".join(words[(i + k) % len(words)] for k in range(8 + i % 5))
            for i in range(start, start + n)]


# Bad JSONL lines, one or two of each record-level reason, spread between good lines.
def _bad_lines(domain: str) -> list[tuple[str, str]]:
    other = "code" if domain == "math" else "math"
    return [("{not json", "malformed"), (json.dumps(["a list"]), "malformed"),
            (json.dumps({"no_text": 1}), "missing_text"), (json.dumps({"text": None}), "missing_text"),
            (json.dumps({"text": 42}), "text_not_string"),
            (json.dumps({"text": ""}), "empty_text"), (json.dumps({"text": "  \n "}), "empty_text"),
            (json.dumps({"text": "x", "domain": "klingon"}), "unknown_domain"),
            (json.dumps({"text": "y", "domain": other}), "domain_mismatch")]


def _interleave(good: list[str], bad: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """Good records with the bad ones spread between them (and a blank line, which is no record)."""
    out: list[tuple[str, str | None]] = [(json.dumps({"text": t}), None) for t in good]
    for k, b in enumerate(bad):
        out.insert(min(len(out), 1 + 3 * k), b)
    out.insert(len(out) // 2, ("", None))
    return out


def _write_lines(path: Path, lines: list[str], compression: str | None = None):
    import pyarrow as pa

    data = ("\n".join(lines) + "\n").encode()
    if compression is None:
        path.write_bytes(data)
        return
    with pa.CompressedOutputStream(str(path), compression) as out:
        out.write(data)


def _own_corpus(dirty: Path, clean: Path) -> dict[str, dict[str, int]]:
    """The same good documents twice: `clean` holds only them; `dirty` holds them with bad records
    of every reason in every file, a `.jsonl.gz`, a `.jsonl.zst` (when pyarrow has zstd), a `.gz`
    cut off part-way, an unreadable shard and stray files. Returns the expected bad counts."""
    import zlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hydra_ray.data.corpus import BAD_REASONS

    expected = {d: dict.fromkeys(BAD_REASONS, 0) for d in DOMAINS}
    zstd = pa.Codec.is_available("zstd")

    def jsonl(domain: str, name: str, rows, compression=None):
        for root in (dirty, clean):
            (root / domain).mkdir(parents=True, exist_ok=True)
        _write_lines(dirty / domain / name, [line for line, _ in rows], compression)
        _write_lines(clean / domain / name, [line for line, r in rows if r is None and line], compression)
        for _, r in rows:
            if r:
                expected[domain][r] += 1

    jsonl("math", "part-0.jsonl", _interleave(_docs("math", 16), _bad_lines("math")))
    jsonl("math", "part-1.jsonl.gz", _interleave(_docs("math", 16, 16), _bad_lines("math")), "gzip")
    (dirty / "math" / "bad.jsonl.gz").write_bytes(b"this is not gzip")  # sorts first: file numbers shift
    expected["math"]["unreadable_file"] += 1
    (dirty / "math" / "notes.txt").write_text("not a shard: warned about, never read")
    (dirty / "math" / "_SUCCESS").write_text("")

    jsonl("code", "a.jsonl", _interleave(_docs("code", 20), _bad_lines("code")))
    jsonl("code", "b.jsonl.zst" if zstd else "b.jsonl", _interleave(_docs("code", 14, 20), _bad_lines("code")),
          "zstd" if zstd else None)
    (dirty / "code" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    expected["code"]["unreadable_file"] += 1

    jsonl("chat", "a.jsonl", _interleave(_docs("chat", 18), _bad_lines("chat")))
    # chat/b.jsonl.gz is cut off part-way: everything flushed before the cut survives (the clean
    # corpus holds exactly that), the rest counts once as truncated_file.
    kept = _interleave(_docs("chat", 12, 18), _bad_lines("chat"))
    lost = [json.dumps({"text": t}) for t in _docs("chat", 10, 30)]
    z = zlib.compressobj(wbits=31)  # gzip
    head = z.compress(("\n".join(line for line, _ in kept) + "\n").encode()) + z.flush(zlib.Z_FULL_FLUSH)
    whole = head + z.compress(("\n".join(lost) + "\n").encode()) + z.flush()
    jsonl("chat", "b.jsonl.gz", kept, "gzip")  # the clean copy and the counts ...
    (dirty / "chat" / "b.jsonl.gz").write_bytes(whole[: len(head) + 12])  # ... and the damaged original
    expected["chat"]["truncated_file"] += 1

    jsonl("finefineweb", "a.jsonl", _interleave(_docs("finefineweb", 16), _bad_lines("finefineweb")))
    good = _docs("finefineweb", 16, 16)
    texts = good[:8] + [None, "", "z", "w"] + good[8:]
    doms = [None] * 8 + [None, "finefineweb", "klingon", "chat"] + ["finefineweb"] * 8
    pq.write_table(pa.table({"text": texts, "domain": doms}), dirty / "finefineweb" / "b.parquet")
    pq.write_table(pa.table({"text": good}), clean / "finefineweb" / "b.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), dirty / "finefineweb" / "c.parquet")  # not strings
    for r, n in (("missing_text", 1), ("empty_text", 1), ("unknown_domain", 1), ("domain_mismatch", 1),
                 ("text_not_string", 3)):
        expected["finefineweb"][r] += n
    return expected


def _own_config(cache: str, corpus: Path, **train):
    from conftest import tiny_config

    cfg = tiny_config(cache, **train)
    return parse_config({**cfg.model_dump(mode="python"), "data": {**cfg.data.model_dump(mode="python"),
                                                                   "corpus": str(corpus)}})


@pytest.fixture(scope="module")
def own_corpus(tmp_path_factory, ray_session, builtin_cache):
    base = tmp_path_factory.mktemp("own-corpus")
    expected = _own_corpus(base / "dirty", base / "clean")
    quiet = lambda *_: None  # noqa: E731
    dirty = prepare_data(_own_config(builtin_cache, base / "dirty"), log=quiet)
    clean = prepare_data(_own_config(builtin_cache, base / "clean"), log=quiet)
    return base, expected, dirty, clean


@pytest.mark.integration
def test_bad_records_of_every_reason_are_counted_and_good_records_all_kept(own_corpus):
    _, expected, dirty, clean = own_corpus
    for d in DOMAINS:
        assert dirty.stats[d]["bad"] == expected[d], d
        assert not any(clean.stats[d]["bad"].values()), d
        # the same documents, tokens, split and sequences as the corpus without the bad records
        for k in ("documents", "eval_documents", "tokens"):
            assert dirty.stats[d][k] == clean.stats[d][k], (d, k)
        assert dirty.stats[d]["tokens"] > 0
        for L in dirty.seq_lens:
            assert dirty.counts[L][d] == clean.counts[L][d] and dirty.counts[L][d]["train"] > 0
            assert np.array_equal(dirty.windows("train", L, d), clean.windows("train", L, d))
            assert np.array_equal(dirty.windows("eval", L, d), clean.windows("eval", L, d))
    report = dirty.report()
    assert all(r in report for r in ("malformed", "missing_text", "text_not_string", "empty_text",
                                     "unknown_domain", "domain_mismatch", "unreadable_file", "truncated_file"))


@pytest.mark.integration
def test_training_on_a_corpus_with_bad_records_has_finite_loss(own_corpus, builtin_cache):
    import math

    from hydra_ray.train.loop import run_local

    base, _, dirty, _ = own_corpus
    cfg = _own_config(builtin_cache, base / "dirty", log_every=1, eval_every=1000, save_every=1000)
    run_local(cfg, str(base / "run"), dirty, end_step=4)
    from hydra_ray.runlog import read_records

    rows = read_records(str(base / "run"), "metrics")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    evals = [v for r in rows for v in (r.get("eval") or {}).values() if isinstance(v, float)]
    assert evals and all(math.isfinite(v) for v in evals), rows[-1].get("eval")


@pytest.mark.integration
def test_one_empty_text_in_one_file_reads_beside_clean_files(tmp_path, ray_session, builtin_cache):
    root = tmp_path / "corpus"
    for d in DOMAINS:
        (root / d).mkdir(parents=True)
        for k in range(3):  # files with and without errors, in every order of blocks
            lines = [json.dumps({"text": t}) for t in _docs(d, 6, 6 * k)]
            if d == "math" and k == 1:
                lines.insert(2, json.dumps({"text": ""}))
            (root / d / f"part-{k}.jsonl").write_text("\n".join(lines) + "\n")
    prep = prepare_data(_cfg(builtin_cache, corpus=str(root)), log=lambda *_: None)
    assert prep.stats["math"]["bad"]["empty_text"] == 1 and sum(prep.stats["math"]["bad"].values()) == 1
    for d in DOMAINS:  # byte tokenizer: one token per byte of every good document
        assert prep.stats[d]["documents"] == 18
        assert prep.stats[d]["tokens"] == sum(len(t.encode()) for t in _docs(d, 18)), d


@pytest.mark.integration
def test_a_weighted_domain_with_only_bad_records_is_an_error_naming_it(tmp_path, ray_session, builtin_cache):
    root = tmp_path / "corpus"
    for d in DOMAINS:
        (root / d).mkdir(parents=True)
        lines = [json.dumps({"text": t}) for t in _docs(d, 6)]
        if d == "chat":
            lines = [json.dumps({"text": ""})] * 4 + ["{broken"] * 2  # malformed comes first in BAD_REASONS
        (root / d / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"weighted by the mixture: chat \(0 good documents, bad records: "
                                          r"6 \(malformed 2, empty_text 4\), e\.g\. .*chat/a\.jsonl line 5: "):
        prepare_data(_cfg(builtin_cache, corpus=str(root)), log=lambda *_: None)
    # weight 0: the domain is reported, not an error
    prep = prepare_data(_cfg(builtin_cache, corpus=str(root), mixture={"math": 1, "code": 1, "finefineweb": 1}),
                        log=lambda *_: None)
    assert prep.stats["chat"]["documents"] == 0 and prep.stats["chat"]["bad"]["empty_text"] == 4


def test_good_records_that_tokenize_to_nothing_pack_no_eos_only_sequences(tmp_path, monkeypatch):
    """A text the tokenizer maps to no tokens would pack to windows of EOS alone, whose labels are
    all ignored (a NaN loss): it counts as empty_text and packs nothing."""
    import pyarrow as pa

    from hydra_ray.data import pack

    class Silent:  # a tokenizer with no tokens for these texts
        def encode_batch(self, texts):
            return [[] for _ in texts]

    monkeypatch.setattr(pack, "load_tokenizer", lambda *a: Silent())
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "a.jsonl").write_text('{"text": "x"}\nnot json\n{"text": "y"}\n')
    item = {"domain": "math", "path": str(tmp_path / "math" / "a.jsonl"), "index": 0, "root": str(tmp_path)}
    row = pack._tokenize_file(pa.Table.from_pylist([item]), ["math"], "byte", None, str(tmp_path / "work")).to_pylist()[0]
    assert (row["documents"], row["tokens"], row["chunks"]) == (0, 0, 0)
    bad = json.loads(row["bad"])
    assert bad["empty_text"] == 2 and bad["malformed"] == 1
    packed = pack._pack_domain("math", [], str(tmp_path / "out"), [8], 0.1, eos=256, pad=257)
    assert packed["documents"] == 0 and all(m["rows"] == 0 for m in packed["shards"].values())
