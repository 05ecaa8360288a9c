"""Sample quality against network calls (NFE) for every sampler that applies to a run.

For each registered sampler that fits the target (diffusion samplers for a diffusion run, `ar*`
samplers for an autoregressive one) and each setting of its sweep (SWEEPS below: step counts
from one token per step down to a few, threshold tau, semi-AR blocks, speculative drafting),
this samples with `tdlm gen-eval`'s machinery (tdlm/studies/geneval.py) and tabulates NFE, tokens/s,
generative perplexity under the AR reference, unigram entropy, repetition and unseen bigrams,
with held-out text as the last row. It writes, under --out (default TARGET/geneval/sampler_quality):
table.md, results.json, sampler_quality.png (the metrics against NFE) and each setting's
gen-eval JSON under settings/ (--figures: its PNG too). Then it checks the issue's two targets:

- threshold: within 10% of the generative perplexity of one-token-per-step decoding
  (`confidence` with steps = generated length) at 4x fewer NFEs or better;
- speculative: 2x fewer sequential target calls than `ancestral` with the same steps (the
  same chain, so the same output distribution; the table shows the metrics side by side);
  for an AR target, `ar-speculative` against `ar`.

A run small enough for a CPU (the two quick recipes, a few minutes each to train):

    tdlm run recipes/quick_wikitext2.toml && tdlm run recipes/quick_wikitext2_ar.toml
    python benchmarks/sampler_quality.py runs/quick_wikitext2 --reference runs/quick_wikitext2_ar \\
        --num 8 --steps 128,32,8
    python benchmarks/sampler_quality.py runs/quick_wikitext2 --reference runs/quick_wikitext2_ar \\
        --draft runs/a_smaller_diffusion_run --samplers ancestral,speculative
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from tdlm.jsontext import dumps
from tdlm.studies.geneval import GenEval, GenEvalError, write_report
from tdlm.studies.report import spaced_ticks

THRESHOLD_TAUS = (0.99, 0.95, 0.9, 0.8, 0.7, 0.5)
DRAFT_STEPS = 4  # speculative: chain steps proposed per round


def semi_ar_settings(steps: list[int], length: int) -> list[dict]:
    """Blocks of a quarter of the canvas, `confidence` inside; the total budget split over blocks."""
    block = max(1, length // 4)
    blocks = math.ceil(length / block)
    inner = sorted({max(1, s // blocks) for s in steps}, reverse=True)
    return [{"block": block, "inner": "confidence", "inner_options": {"steps": k}} for k in inner]


SWEEPS = {  # sampler name -> (steps, generated length, draft) -> option dicts
    "ancestral": lambda steps, length, draft: [{"steps": s} for s in steps],
    "confidence": lambda steps, length, draft: [{"steps": s} for s in steps],
    "threshold": lambda steps, length, draft: [{"tau": tau} for tau in THRESHOLD_TAUS],  # --taus overrides
    "semi-ar": lambda steps, length, draft: semi_ar_settings(steps, length),
    "speculative": lambda steps, length, draft: [{"steps": s, "draft": draft, "draft_steps": DRAFT_STEPS}
                                                 for s in steps],
    "ar-speculative": lambda steps, length, draft: [{"draft": draft, "gamma": g} for g in (2, 4, 8)],
}


def default_sweep(fields: set[str], steps: list[int], draft: str | None) -> list[dict]:
    """A sampler without an entry in SWEEPS: its steps if it has them, else its defaults."""
    base = {"draft": draft} if "draft" in fields else {}
    return [{**base, "steps": s} for s in steps] if "steps" in fields else [base]


def plan(evaluator: GenEval, names: list[str] | None, steps: list[int], length: int,
         draft: str | None) -> tuple[list[tuple[str, dict]], list[str]]:
    """(sampler, options) to run, and notes on what was skipped and why."""
    registry, causal = evaluator.registry, evaluator.causal
    todo, notes = [], []
    for name in names or registry.names("sampler"):
        component = registry.get("sampler", name)
        if names is None and component.cls.causal != causal:  # what the sampler declares it drives
            continue
        fields = set(component.config_cls.model_fields)
        sweep = SWEEPS[name](steps, length, draft) if name in SWEEPS else default_sweep(fields, steps, draft)
        for options in sweep:
            unknown = set(options) - fields
            if unknown:
                notes.append(f"{name}: skipped {options} (no option {', '.join(sorted(unknown))})")
            elif "draft" in options and options["draft"] is None:
                notes.append(f"{name}: skipped (needs a draft run: --draft RUN)")
                break
            else:
                # the model's own distribution, whatever temperature the recipe samples at: a
                # recipe's cooler display sample must not tilt one sampler's row
                todo.append((name, {"temperature": 1.0, **options} if "temperature" in fields else options))
    return todo, notes


def setting_label(options: dict) -> str:
    """The options that tell rows apart (temperature only where it is not 1)."""
    flat = {**{k: v for k, v in options.items()
               if k not in ("inner_options", "draft") and not (k == "temperature" and v == 1.0)},
            **(options.get("inner_options") or {})}
    return " ".join(f"{k}={v}" for k, v in flat.items()) or "defaults"


COLUMNS = [("NFE", "nfe", "g"), ("tokens/s", "tokens_per_s", ".0f"), ("gen ppl", "gen_ppl", ".2f"),
           ("entropy (bits)", "unigram_entropy_bits", ".3f"), ("distinct-2", "distinct_2", ".3f"),
           ("repetition", "repetition_rate", ".4f"), ("unseen bigrams", "unseen_bigram_share", ".4f")]


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown_table(rows: list[dict], data: dict) -> str:
    lines = ["| sampler | setting | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = [_fmt(row.get(key), spec) for _, key, spec in COLUMNS]
        lines.append(f"| {row['sampler']} | {row['setting']} | " + " | ".join(cells) + " |")
    cells = ["-" if key in ("nfe", "tokens_per_s") else _fmt(data.get(key), spec) for _, key, spec in COLUMNS]
    lines.append("| held-out text | valid split | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(rows: list[dict], generated: int) -> list[str]:
    """The issue's two targets, as measured."""
    lines = []
    base = [r for r in rows if r["sampler"] == "confidence" and r["options"].get("steps") == generated]
    thresholds = [r for r in rows if r["sampler"] == "threshold"]
    if base and thresholds and base[0]["gen_ppl"]:
        b = base[0]
        lines.append(f"threshold vs one token per step (confidence steps={generated}: NFE {b['nfe']}, "
                     f"gen ppl {b['gen_ppl']:.2f}):")
        met = False
        for r in thresholds:
            speedup, ratio = b["nfe"] / r["nfe"], r["gen_ppl"] / b["gen_ppl"]
            ok = speedup >= 4 and ratio <= 1.10
            met |= ok
            lines.append(f"  tau={r['options']['tau']}: {speedup:.1f}x fewer NFEs, gen ppl x{ratio:.3f}"
                         + ("  <- meets the target" if ok else ""))
        lines.append(f"  target (<= 10% gen ppl at >= 4x fewer NFEs): {'met' if met else 'not met'}")
    elif thresholds:
        lines.append(f"threshold: no baseline (needs confidence with steps={generated} and a --reference)")
    for fast, slow, key in (("speculative", "ancestral", "steps"), ("ar-speculative", "ar", None)):
        spec = [r for r in rows if r["sampler"] == fast]
        slow_rows = {r["options"].get(key) if key else None: r for r in rows if r["sampler"] == slow}
        if spec:
            lines.append(f"{fast} vs {slow}" + (f", same {key} (the same chain):" if key else ":"))
        for r in spec:
            a, label = slow_rows.get(r["options"].get(key) if key else None), r["setting"]
            accept = (r.get("stats") or {}).get("acceptance_rate")
            if a is None:
                lines.append(f"  {label}: no {slow} row to compare with")
                continue
            cut = a["nfe"] / r["nfe"]
            lines.append(f"  {label}: target calls {a['nfe']} -> {r['nfe']} ({cut:.2f}x"
                         f"{', meets the 2x target' if cut >= 2 else ''}); acceptance {_fmt(accept, '.3f')}; "
                         f"gen ppl {_fmt(a['gen_ppl'], '.2f')} vs {_fmt(r['gen_ppl'], '.2f')}, entropy "
                         f"{a['unigram_entropy_bits']:.3f} vs {r['unigram_entropy_bits']:.3f} bits")
    return lines


PANELS = [("gen_ppl", "generative perplexity"), ("unigram_entropy_bits", "unigram entropy (bits)"),
          ("repetition_rate", "adjacent repeated-token rate"), ("unseen_bigram_share", "unseen-bigram share")]


MARKERS = "osD^vP*X"
LINESTYLES = ["-", "--", "-.", ":"]


def sampler_lines(rows: list[dict], key: str) -> list[tuple[str, list[tuple]]]:
    """(legend label, sorted (NFE, value) points) per sampler for one panel. A sampler whose
    points equal an earlier one's says so in its label: drawn on top, it would hide that one."""
    lines = []
    for name in dict.fromkeys(r["sampler"] for r in rows):
        points = sorted((r["nfe"], r[key]) for r in rows if r["sampler"] == name and r.get(key) is not None)
        if points:
            same = [label for label, other in lines if other == points]
            lines.append((f"{name} (same points as {same[0]})" if same else name, points))
    return lines


def plot(rows: list[dict], data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        lines = sampler_lines(rows, key)
        for i, (label, points) in enumerate(lines):
            # Each sampler its own marker and dash, later ones smaller: coinciding points stay visible.
            ax.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)], ms=max(3, 9 - 1.5 * i), mfc="none",
                    linestyle=LINESTYLES[i % len(LINESTYLES)], label=label, color=f"C{i}")
        if data.get(key) is not None:
            ax.axhline(data[key], color="gray", ls="--", label="held-out text")
        ax.set_xscale("log")
        ticks = spaced_ticks(sorted({r["nfe"] for r in rows}))  # the NFEs run, labelled plainly
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        if key == "gen_ppl":
            ax.set_yscale("log")
        ax.set(xlabel="NFE (network calls)", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    global THRESHOLD_TAUS  # --taus replaces the default thresholds
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="the run to sample from")
    parser.add_argument("--reference", help="an autoregressive run with the same tokenizer (generative perplexity)")
    parser.add_argument("--samplers", help="comma-separated sampler names (default: all that apply)")
    parser.add_argument("--steps", help="comma-separated step counts (default: length, length/2, ... 4)")
    parser.add_argument("--draft", help="a small diffusion run drafting for the speculative samplers")
    parser.add_argument("--num", type=int, default=16, help="samples per setting")
    parser.add_argument("--taus", help=f"comma-separated thresholds for `threshold` (default: {THRESHOLD_TAUS})")
    parser.add_argument("--length", type=int, default=None, help="tokens per sample (default: seq_len)")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--out", default=None)
    parser.add_argument("--figures", action="store_true",
                        help="also save each setting's gen-eval PNG (the frequency collapse is the same in all)")
    args = parser.parse_args(argv)
    if args.taus:
        THRESHOLD_TAUS = tuple(float(tau) for tau in args.taus.split(","))

    try:
        evaluator = GenEval(args.target, reference=args.reference, which=args.checkpoint, device=args.device)
    except (GenEvalError, OSError, ValueError) as exc:
        print(f"sampler_quality: {exc}", file=sys.stderr)
        return 2
    length = args.length or evaluator.target.cfg.data.seq_len
    generated = length - (len(evaluator.vocab.encode(args.prompt)) if args.prompt else 0)
    if args.steps:
        steps = [int(s) for s in args.steps.split(",")]
    else:
        steps = sorted({max(4, generated >> k) for k in range(8) if generated >> k >= 4} | {generated}, reverse=True)
    names = args.samplers.split(",") if args.samplers else None
    todo, notes = plan(evaluator, names, steps, generated, args.draft)
    out = Path(args.out) if args.out else Path(args.target) / "geneval" / "sampler_quality"
    (out / "settings").mkdir(parents=True, exist_ok=True)

    with torch.no_grad():  # warm up (kernels, caches) so the first setting's tokens/s is fair
        evaluator.net(torch.full((min(args.num, 2), length), evaluator.vocab.mask_id, device=evaluator.device))
    rows, data = [], {}
    for name, options in todo:
        try:
            result = evaluator.evaluate(sampler=name, options=options, num=args.num, length=length,
                                        prompt=args.prompt, seed=args.seed, batch_size=args.batch_size)
        except GenEvalError as exc:
            notes.append(f"{name} {setting_label(options)}: failed: {exc}")
            print(notes[-1], file=sys.stderr)
            continue
        write_report(result, out / "settings", png=args.figures)
        data = result["data"]
        rows.append({"setting": setting_label(options),
                     **{k: v for k, v in result.items() if k not in ("samples", "tokens", "frequency_collapse")}})
        print(f"{name:<12} {setting_label(options):<32} NFE {result['nfe']:>5}  gen ppl "
              f"{_fmt(result['gen_ppl'], '.2f'):>8}  {result['seconds']:.1f} s", file=sys.stderr)

    table = markdown_table(rows, data)
    targets = check_targets(rows, generated) if rows else []
    report = "\n".join([f"# Sampler quality: {args.target}", "",
                        f"reference: {args.reference or 'none'}; {args.num} samples x {generated} generated "
                        f"tokens; seed {args.seed}; device {evaluator.device}", "", table, "", *targets,
                        *([""] + [f"- {n}" for n in notes] if notes else [])])
    (out / "table.md").write_text(report + "\n")
    (out / "results.json").write_text(dumps({"rows": rows, "data": data, "notes": notes, "targets": targets}))
    if rows:
        plot(rows, data, out / "sampler_quality.png")
    print(report)
    print(f"\nsaved {out / 'table.md'}, {out / 'results.json'} and {out / 'sampler_quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
