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
        sizes = parse_mesh(args.mesh)
        mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                             axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
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


def _serve(args) -> int:
    import contextlib

    import jax

    from ling.serving import Engine, EngineConfig, Limits, Request, output_record, parse_line

    model, tokenizer, mesh = _load(args)
    mc = model.config
    limit = min(args.max_len or mc.max_position_embeddings, mc.max_position_embeddings)
    limits = Limits(vocab_size=mc.vocab_size, max_len=limit)
    defaults = _defaults(args)
    if args.prompt is not None:
        lines = [json.dumps({"prompt": args.prompt})]
    else:
        with open(args.input) as f:
            lines = f.read().splitlines()
    parsed = []  # (input position, Request or error record)
    for n, line in enumerate(lines, 1):
        if line.strip():
            parsed.append(parse_line(line, n, limits, tokenizer, defaults))
    requests = [(i, r) for i, r in enumerate(parsed) if isinstance(r, Request)]
    need = max((len(r.prompt_ids) + r.max_new_tokens for _, r in requests), default=1)
    config = EngineConfig(max_slots=args.max_slots, max_len=args.max_len or need, page_size=args.page_size,
                          num_pages=args.num_pages, prefill_chunk=args.prefill_chunk)
    detok = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    engine = Engine(model, config, detokenize=detok)
    out = open(args.output, "w") if args.output else sys.stdout
    results, next_out, t0, n_tok = {}, 0, time.time(), 0
    errors = sum(not isinstance(r, Request) for r in parsed)

    def flush():
        nonlocal next_out
        while next_out < len(parsed) and (next_out in results or not isinstance(parsed[next_out], Request)):
            rec = results.pop(next_out, None) or parsed[next_out]
            out.write(json.dumps(rec) + "\n")
            next_out += 1
        out.flush()

    def progress(done):
        rate = n_tok / max(time.time() - t0, 1e-9)
        print(f"\r[serve] {done}/{len(requests)} requests done, {errors} errors, {n_tok} tokens, {rate:.1f} tok/s",
              end="", file=sys.stderr, flush=True)

    streamed = []

    def stream(_request, token):
        streamed.append(token)
        if tokenizer is None:
            print(token, end=" ", flush=True)
        else:
            before = len(detok(streamed[:-1]))
            print(detok(streamed)[before:], end="", flush=True)

    position = {id(r): i for i, r in requests}
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    done = 0
    with ctx:
        for fin in engine.run([r for _, r in requests], on_token=stream if args.prompt is not None else None):
            i = position[id(fin.request)]
            if fin.error is not None:
                results[i] = {"id": fin.request.id, "error": fin.error}
                errors += 1
            else:
                results[i] = output_record(fin.request, fin.token_ids, fin.finish_reason, tokenizer)
                n_tok += len(fin.token_ids)
            done += 1
            if args.prompt is None:
                progress(done)
                flush()
    if args.prompt is not None:
        print(file=sys.stderr)
        rec = results.get(0) or parsed[0]
        if "error" in rec:
            print(f"error: {rec['error']}", file=sys.stderr)
            return 1
        print(f"\n[finish_reason: {rec['finish_reason']}, {len(rec['token_ids'])} tokens]", file=sys.stderr)
        return 0
    flush()
    print(file=sys.stderr)
    if out is not sys.stdout:
        out.close()
    return 0


def main(argv=None) -> int:
    args = _args(argv)
    return _plan(args) if args.plan else _serve(args)


if __name__ == "__main__":
    sys.exit(main())
