"""`hydra-ray eval RUN[@STEP]`: a checkpoint scored on held-out, generated tasks per domain.

- math: exact match of the final answer (`Answer: X.`) after greedy decoding of a problem the
  corpus generator wrote but training never saw;
- code: the share of completions of held-out standard-library function headers that parse with
  `ast.parse` and add at least one statement after the docstring (a bare docstring parses too);
- chat: the share of replies that keep the dialogue format: non-empty, ended by the model itself
  (the next user turn or EOS, not the token limit), and no role prefix inside the reply;
- every domain: perplexity of held-out documents, with causal routing, as the served model sees
  text.

Design choices
- "Chance" is measured, not assumed: the same tasks are scored on the checkpoint's model with its
  weights re-initialised (same config, same feature switches). A score within `NEAR_CHANCE` of it
  is reported as near chance.
- Tasks come from the built-in corpus' held-out generators (data/builtin.py), fixed by `seed`, so
  two checkpoints (or the runs of an ablation) are scored on the same items.
- Decoding goes through the serving engine (serve/engine.py), the code path users get.
- The result is written to RUN/eval/step_XXXXXXXX.json (local or a URI); `hydra-ray analyze`
  adds the newest one to its report, and `hydra-ray ablate` to its table.
"""

from __future__ import annotations

import ast
import json
import math
import textwrap
import time

import torch

from hydra_ray import storage
from hydra_ray.config import ConfigError

TASKS = ("math", "code", "chat")
MAX_TOKENS = {"math": 160, "code": 128, "chat": 96}  # bytes: a worked solution takes a few lines
NEAR_CHANCE = 0.05  # absolute rate above the untrained model's under which a score is "near chance"
PPL_WINDOWS = 8  # held-out windows of seq_len per domain for perplexity


# --------------------------------------------------------------------------- scoring (pure)
def math_answer(completion: str) -> str | None:
    """The final answer of the first problem in a completion: the text after `Answer: ` up to the
    end of its line, without the closing full stop."""
    for line in completion.splitlines():
        if "Answer: " in line:
            return line.split("Answer: ", 1)[1].strip().removesuffix(".").strip()
    return None


def code_ok(header: str, completion: str, finish_reason: str | None) -> bool:
    """The header plus its completion parses, and the function body holds a statement beyond the
    docstring. A completion cut by the token limit is judged up to its last full line."""
    if finish_reason == "length" and "\n" in completion:
        completion = completion[: completion.rindex("\n") + 1]
    try:
        tree = ast.parse(textwrap.dedent(header + completion))
    except (SyntaxError, ValueError):
        return False
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None:
        return False
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
        getattr(fn.body[0], "value", None), ast.Constant) else fn.body
    return len(body) > 0


def chat_ok(reply: str, finish_reason: str | None, template) -> bool:
    """A reply that keeps the dialogue format (see the module docstring)."""
    prefixes = [p.strip() for p in (template.user, template.assistant, template.system) if p.strip()]
    lines = [ln.strip() for ln in reply.splitlines()]
    return bool(reply.strip()) and finish_reason == "stop" and not any(
        ln.startswith(p) for ln in lines for p in prefixes)


# --------------------------------------------------------------------------- running
def _greedy(engine, prompts: list[str], max_tokens: int, stop: list[str], domain: str | None) -> list[dict]:
    from hydra_ray.serve.decode import GenRequest

    ctx = engine.max_context - max_tokens
    reqs = [GenRequest(prompt_ids=engine.encode(p)[-ctx:], max_tokens=max_tokens, temperature=0.0, stop=stop,
                       domain=domain if domain in engine.domains else None) for p in prompts]
    return engine.complete(reqs)


def _scores(engine, n: int, seed: int, tasks: tuple[str, ...] = TASKS) -> dict:
    from hydra_ray.data import builtin, chat

    t = engine.cfg.data.chat_template
    out: dict = {}
    if "math" in tasks:
        math_items = builtin.math_tasks(n, seed)
        res = _greedy(engine, [p for p, _ in math_items], MAX_TOKENS["math"], ["\n\n", "\nProblem:"], "math")
        hits = [math_answer(r["text"]) == a for r, (_, a) in zip(res, math_items)]
        out["math"] = {"metric": "exact-match accuracy", "score": sum(hits) / len(hits), "n": len(hits),
                       "example": {"prompt": math_items[0][0][-200:], "completion": res[0]["text"],
                                   "answer": math_items[0][1]}}
    if "code" in tasks:
        headers = builtin.code_tasks(n, seed)
        res = _greedy(engine, headers, MAX_TOKENS["code"], ["\ndef ", "\nclass ", "\n\n\n", "\n@"], "code")
        ok = [code_ok(h, r["text"], r["finish_reason"]) for h, r in zip(headers, res)]
        out["code"] = {"metric": "share that parses with a body", "score": sum(ok) / len(ok), "n": len(ok),
                       "example": {"prompt": headers[0][-200:], "completion": res[0]["text"]}}
    if "chat" in tasks:
        convs = builtin.chat_tasks(n, seed)
        prompts = [chat.render(c, t, reply=True) for c in convs]
        res = _greedy(engine, prompts, MAX_TOKENS["chat"], chat.stop_strings(t), t.domain)
        ok = [chat_ok(r["text"], r["finish_reason"], t) for r in res]
        out["chat"] = {"metric": "share of replies in the dialogue format", "score": sum(ok) / len(ok),
                       "n": len(ok), "example": {"prompt": prompts[0][-200:], "completion": res[0]["text"]}}
    return out


def task_scores(path: str, tasks: tuple[str, ...], n: int, seed: int = 0) -> dict[str, float]:
    """The scores (0-1) of the checkpoint at `path` on `tasks`, on CPU: what a Tune trial reports
    when the sweep optimises a task (`hydra-ray tune --metric task_chat`)."""
    from hydra_ray.serve.engine import Engine

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}: expected some of {list(TASKS)}")
    engine = Engine.from_checkpoint(path, device="cpu")
    return {k: v["score"] for k, v in _scores(engine, n, seed, tasks).items()}


@torch.no_grad()
def perplexity(engine, n_docs: int, seed: int) -> dict[str, float]:
    """exp(mean token CE) of held-out documents per domain, causal routing, PPL_WINDOWS windows each."""
    from hydra_ray.data import builtin

    model, L, dev = engine.model, engine.cfg.model.seq_len, engine.device
    eos = engine.tokenizer.eos_id
    out = {}
    for d in engine.domains:
        if d not in builtin.DOMAINS:
            continue
        stream: list[int] = []
        for doc in builtin.heldout_documents(d, n_docs, seed):
            stream += engine.encode(doc) + [eos]
            if len(stream) >= PPL_WINDOWS * L + 1:
                break
        n_win = max(1, min(PPL_WINDOWS, (len(stream) - 1) // L))
        stream = stream[: n_win * L + 1]
        x = torch.tensor([stream[i * L: (i + 1) * L] for i in range(n_win) if len(stream[i * L: (i + 1) * L + 1]) > 1],
                         device=dev)
        y = torch.tensor([stream[i * L + 1: (i + 1) * L + 1] for i in range(len(x))], device=dev)
        if x.shape[1] != y.shape[1]:  # a short last window: drop its unmatched input
            x = x[:, : y.shape[1]]
        dom = torch.full_like(x, engine.domains.index(d))
        ce = model(x, y, dom, causal=True).ce
        out[d] = math.exp(float(ce))
    return out


def untrained_twin(engine):
    """The engine's model with freshly initialised weights and the same buffers (feature switches,
    routing maps): the measured 'chance' of every score."""
    from hydra_ray.models import HydraLM
    from hydra_ray.serve.engine import Engine

    torch.manual_seed(0)
    fresh = HydraLM(engine.cfg.model)
    state = engine.model.state_dict()
    state.update({n: p.detach() for n, p in fresh.named_parameters(remove_duplicate=False)})  # fresh weights, trained buffers
    fresh.load_state_dict(state)
    return Engine(fresh, engine.cfg, engine.model_id + "-untrained", engine.step, device=engine.device)


def evaluate(engine, n: int = 32, seed: int = 0, chance: bool = True, log=print) -> dict:
    t0 = time.time()
    tasks = _scores(engine, n, seed)
    ppl = perplexity(engine, 4 * n, seed)
    res = {"checkpoint": engine.model_id, "step": engine.step, "n": n, "seed": seed, "tasks": tasks,
           "perplexity": ppl}
    if chance:
        twin = untrained_twin(engine)
        base = _scores(twin, n, seed)
        res["chance_perplexity"] = perplexity(twin, 4 * n, seed)
        for k, v in tasks.items():
            v["chance"] = base[k]["score"]
            v["near_chance"] = v["score"] - v["chance"] < NEAR_CHANCE
    res["seconds"] = time.time() - t0
    for k, v in tasks.items():
        note = ""
        if "chance" in v:
            note = f" (untrained: {v['chance']:.2f}{'; near chance' if v['near_chance'] else ''})"
        log(f"  {k:<5} {v['metric']}: {v['score']:.2f} of {v['n']}{note}")
    log("  perplexity " + ", ".join(f"{d} {p:.2f}" for d, p in ppl.items()) +
        (" (untrained: " + ", ".join(f"{p:.0f}" for p in res["chance_perplexity"].values()) + ")" if chance else ""))
    return res


def resolve(spec: str) -> tuple[str, str]:
    """RUN or RUN@STEP (RUN a folder or a URI) -> (checkpoint path, RUN@STEP id)."""
    from hydra_ray.serve.errors import EngineError
    from hydra_ray.serve.store import CheckpointStore

    run, _, step = spec.rpartition("@") if "@" in storage.name(spec) else (spec, "", "")
    try:
        store, latest = CheckpointStore.for_run(run)
        ref = store.resolve(f"{store.run}@{int(step)}" if step else latest)
    except ValueError:
        raise ConfigError(f"{spec}: STEP must be a number (RUN@STEP)") from None
    except EngineError as e:
        raise ConfigError(f"{spec}: {e.message}") from None
    return ref.path, ref.model_id


def result_path(run: str, step: int) -> str:
    return storage.join(run, "eval", f"step_{step:08d}.json")


def latest_result(run: str) -> dict | None:
    """The newest `hydra-ray eval` result stored in a run, if any."""
    folder = storage.join(run, "eval")
    if not storage.is_dir(folder):
        return None
    names = sorted(n for n, is_dir in storage.listdir(folder) if not is_dir and n.startswith("step_") and n.endswith(".json"))
    for name in reversed(names):
        try:
            return json.loads(storage.read_bytes(storage.join(folder, name)))
        except (OSError, ValueError) as e:
            import logging

            logging.getLogger(__name__).warning("skipping eval result %s: %s", name, e)
    return None


def run(args) -> int:
    from hydra_ray.serve.engine import Engine
    from hydra_ray.serve.errors import EngineError

    if args.n < 1 or args.n > 1000:
        raise ConfigError("--n must be between 1 and 1000")
    path, model_id = resolve(args.checkpoint)
    try:
        engine = Engine.from_checkpoint(path, model_id, device="cpu" if args.cpu else None)
    except EngineError as e:
        raise ConfigError(e.message) from None
    if not args.json:
        print(f"eval {model_id}: {args.n} held-out items per task (seed {args.seed})")
    res = evaluate(engine, args.n, args.seed, chance=not args.no_chance, log=(lambda *_: None) if args.json else print)
    run_dir = storage.parent(storage.parent(path))
    if not args.no_save:
        dest = result_path(run_dir, engine.step)
        storage.write_bytes(dest, (json.dumps(res, indent=1) + "\n").encode())
        if not args.json:
            print(f"wrote {dest} ({res['seconds']:.0f} s)")
    if args.json:
        print(json.dumps(res))
    return 0
