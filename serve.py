"""Batch and interactive inference for Ling checkpoints, and serving memory plans.

    python serve.py --checkpoint DIR --input prompts.jsonl --output out.jsonl     # batch job (JSONL in/out)
    python serve.py --checkpoint DIR --prompt "Once upon a time"                  # stream tokens to the terminal
    python serve.py --plan --config configs/ling-2.5-1t.yaml --context 1048576 --mesh tensor=8,expert=8 [--json]

DIR is a published-format checkpoint (config.json + *.safetensors, tokenizer.json optional). Orbax train
checkpoints are converted first (see docs/serving.md). Output lines follow input order. See docs/serving.md.
"""
import argparse
import json
import os
import sys
import time


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="published-format checkpoint directory")
    io = p.add_mutually_exclusive_group()
    io.add_argument("--input", help="JSONL requests (one JSON object per line)")
    io.add_argument("--prompt", help="one text prompt; tokens are streamed to stdout")
    io.add_argument("--plan", action="store_true", help="print the serving memory plan and exit")
    p.add_argument("--output", help="JSONL results (default: stdout)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-slots", type=int, default=8, help="sequences decoded together")
    g.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence (default: what the longest request needs, up to the model's context)")
    g.add_argument("--page-size", type=int, default=64, help="tokens per MLA cache page")
    g.add_argument("--num-pages", type=int, default=None, help="cache pool pages (default: every slot at max-len)")
    g.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step (power of 2)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's")
    g.add_argument("--mesh", default=None, help="device mesh, e.g. tensor=2,expert=4")
    g.add_argument("--compilation-cache-dir", default=None,
                   help="keep compiled prefill/decode programs here across runs (JAX's persistent cache)")
    s = p.add_argument_group("defaults for requests that do not set them (and for --prompt)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    pl = p.add_argument_group("--plan")
    pl.add_argument("--config", help="model config (configs/*.yaml or a config.json / checkpoint dir)")
    pl.add_argument("--context", type=int, default=1 << 20)
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--device-gib", type=float, default=None, help="memory per device (default: detected)")
    pl.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.plan and not args.checkpoint:
        p.error("--checkpoint is required (unless --plan)")
    if not args.plan and args.input is None and args.prompt is None:
        p.error("give --input FILE.jsonl, --prompt TEXT or --plan")
    return args


def _plan(args) -> int:
    from ling.config import LingConfig, load_yaml_config
    from ling.serving.plan import GIB, memory_plan, parse_mesh

    source = args.config or args.checkpoint
    if source is None:
        raise SystemExit("--plan needs --config (a configs/*.yaml or config.json) or --checkpoint")
    config = load_yaml_config(source) if source.endswith((".yaml", ".yml")) else LingConfig.from_hf(source)
    import jax.numpy as jnp
    plan = memory_plan(config, args.context, batch=args.batch, mesh=parse_mesh(args.mesh),
                       dtype=jnp.float32 if args.dtype == "float32" else jnp.bfloat16, page_size=args.page_size,
                       prefill_chunk=args.prefill_chunk,
                       device_bytes=None if args.device_gib is None else int(args.device_gib * GIB))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
    return 0 if plan.fits else 1


def _load(args):
    import jax
    import jax.numpy as jnp

    import ling
    from ling.serving.plan import parse_mesh

    d = args.checkpoint
    if not os.path.exists(os.path.join(d, "config.json")):
        raise SystemExit(f"{d} has no config.json: serve.py reads published-format checkpoints; convert an orbax "
                         "train checkpoint first (python -m ling.convert, see docs/serving.md)")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
    mesh = None
    if args.mesh:
        import math

        import sharding

        sizes = parse_mesh(args.mesh)
        n = math.prod(sizes.values())
        if n > jax.device_count():
            raise SystemExit(f"--mesh {args.mesh} needs {n} devices; {jax.device_count()} are attached")
        mesh = sharding.make_mesh(sizes, devices=jax.devices()[:n])
    model = ling.from_pretrained(d, dtype=dtype, mesh=mesh)
    tokenizer = None
    if os.path.exists(os.path.join(d, "tokenizer.json")):
        from trainer.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(os.path.join(d, "tokenizer.json"))
    return model, tokenizer, mesh


def _defaults(args) -> dict:
    d = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
         "top_k": args.top_k, "seed": args.seed}
    return {**d, "stop": args.stop} if args.stop else d


def _read(args, limits, tokenizer) -> list:
    """One Request or error record per non-blank input line (or for --prompt), in input order."""
    from ling.serving import parse_line

    if args.prompt is not None:
        lines = [json.dumps({"prompt": args.prompt})]
    else:
        with open(args.input) as f:
            lines = f.read().splitlines()
    return [parse_line(line, n, limits, tokenizer, _defaults(args)) for n, line in enumerate(lines, 1)
            if line.strip()]


class _OrderedWriter:
    """Writes result records in input order as soon as every earlier one is known; reports progress on stderr."""

    def __init__(self, items: list, out, n_requests: int):
        self.items, self.out, self.n_requests = items, out, n_requests
        self.results, self.next, self.done, self.tokens, self.t0 = {}, 0, 0, 0, time.time()
        self.errors = sum(isinstance(x, dict) for x in items)

    def add(self, index: int, record: dict) -> None:
        self.results[index] = record
        self.done += 1
        self.errors += "error" in record
        self.tokens += len(record.get("token_ids", ()))
        rate = self.tokens / max(time.time() - self.t0, 1e-9)
        print(f"\r[serve] {self.done}/{self.n_requests} requests done, {self.errors} errors, {self.tokens} tokens, "
              f"{rate:.1f} tok/s", end="", file=sys.stderr, flush=True)
        self.flush()

    def flush(self) -> None:
        while self.next < len(self.items) and (self.next in self.results or isinstance(self.items[self.next], dict)):
            self.out.write(json.dumps(self.results.pop(self.next, None) or self.items[self.next]) + "\n")
            self.next += 1
        self.out.flush()


def _serve(args) -> int:
    import contextlib

    import jax

    from ling.serving import Engine, EngineConfig, Limits, Request, output_record

    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compilation_cache_dir))
    model, tokenizer, mesh = _load(args)
    mc = model.config
    if args.max_len is not None and not 1 <= args.max_len <= mc.max_position_embeddings:
        raise SystemExit(f"--max-len {args.max_len} must be in [1, max_position_embeddings="
                         f"{mc.max_position_embeddings}]")
    items = _read(args, Limits(vocab_size=mc.vocab_size, max_len=args.max_len or mc.max_position_embeddings),
                  tokenizer)
    requests = [(i, r) for i, r in enumerate(items) if isinstance(r, Request)]
    need = max((len(r.prompt_ids) + r.max_new_tokens for _, r in requests), default=1)
    config = EngineConfig(max_slots=args.max_slots, max_len=args.max_len or need, page_size=args.page_size,
                          num_pages=args.num_pages, prefill_chunk=args.prefill_chunk)
    detok = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    engine = Engine(model, config, detokenize=detok)
    results = {}  # input position -> output record
    position = {id(r): i for i, r in requests}
    mesh_ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    if args.prompt is not None:
        streamed = []

        def stream(_request, token):
            streamed.append(token)
            if detok is None:
                print(token, end=" ", flush=True)
            else:  # decode the whole tail: a token may complete a multi-byte character
                print(detok(streamed)[len(detok(streamed[:-1])):], end="", flush=True)

        with mesh_ctx:
            for fin in engine.run([r for _, r in requests], on_token=stream):
                results[0] = {"error": fin.error} if fin.error else {"finish_reason": fin.finish_reason,
                                                                     "n": len(fin.token_ids)}
        rec = results.get(0) or items[0]
        if "error" in rec:
            print(f"error: {rec['error']}", file=sys.stderr)
            return 1
        print(f"\n[{rec['finish_reason']}, {rec['n']} tokens]", file=sys.stderr)
        return 0
    out = open(args.output, "w") if args.output else sys.stdout
    writer = _OrderedWriter(items, out, len(requests))
    with mesh_ctx:
        for fin in engine.run([r for _, r in requests]):
            writer.add(position[id(fin.request)], {"id": fin.request.id, "error": fin.error} if fin.error else
                       output_record(fin.request, fin.token_ids, fin.finish_reason, tokenizer))
    writer.flush()
    print(file=sys.stderr)
    if out is not sys.stdout:
        out.close()
    return 0


def main(argv=None) -> int:
    args = _args(argv)
    return _plan(args) if args.plan else _serve(args)


if __name__ == "__main__":
    sys.exit(main())
