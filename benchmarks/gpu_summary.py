"""The summary of a gpu_benchmarks.sh run: each step's status and time, and the GPU targets against
what the JSONs in its folder measured (complete or cut short), as markdown; printed and written to
summary.md in that folder.

    python benchmarks/gpu_summary.py OUT_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The targets: an H200, the original recipe measured in the same run.
VS_ORIGINAL, SHARE_OF_MATMUL, SHARE_OF_STEP = 10.0, 0.25, 0.95


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _met(ok: bool | None) -> str:
    return {True: "yes", False: "no", None: "-"}[ok]


def step_rows(folder: Path) -> list[str]:
    """steps.tsv (name, exit status, seconds, limit) as table rows."""
    rows = []
    path = folder / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, limit = line.split("\t")
        state = {"0": "done", "124": "stopped at its time limit", "137": "killed at its time limit"}.get(
            status, f"failed (exit status {status})")
        rows.append(f"| {name} | {state} | {seconds} s | {limit if limit == '-' else limit + ' s'} |")
    return rows


def target_rows(throughput: dict | None, choice: dict | None) -> list[str]:
    rows = []
    if throughput is None:
        rows.append("| train_throughput.json | missing: no throughput figures | - |")
    else:
        partial = "" if throughput.get("complete") else " (run cut short)"
        ratio = throughput["ratio_vs_original"]
        rates = f"{throughput['end_to_end_img_s']:,.0f} against {throughput['original_img_s']:,.0f} img/s"
        rows.append(f"| end-to-end epoch >= {VS_ORIGINAL:.0f}x the original recipe, default settings, batch "
                    f"{throughput.get('batch_size', 64)}{partial} | {ratio:.1f}x ({rates}) | "
                    f"{_met(ratio >= VS_ORIGINAL)} |")
        share = throughput["ratio_to_model_step"]
        rows.append(f"| end-to-end >= {SHARE_OF_STEP:.0%} of the model step, default settings | {share:.0%} of the "
                    f"fastest step | {_met(share >= SHARE_OF_STEP)} |")
        settings = throughput.get("settings", {})
        best = settings.get("best_step")
        if best:
            shares = {key.removeprefix("share_of_"): value for key, value in best.items()
                      if key.startswith("share_of_")}
            text = ", ".join(f"{value:.0%} of {kind}" for kind, value in shares.items())
            rows.append(f"| model step >= {SHARE_OF_MATMUL:.0%} of the bf16 or TF32 matrix-product rate | "
                        f"{best['row']}: {best['tflops']:.1f} TFLOP/s, {text} | "
                        f"{_met(any(v >= SHARE_OF_MATMUL for v in shares.values()) if shares else None)} |")
        for name, row in settings.get("end_to_end", {}).items():
            rate = f"{row['img_s']:,.0f} img/s ({row['vs_original']:.1f}x the original)"
            share = row.get("share_of_step")
            if share is None:  # no model-step row of its settings (the larger batches)
                rows.append(f"| end-to-end {name} | {rate} | - |")
            else:
                rows.append(f"| end-to-end {name} >= {SHARE_OF_STEP:.0%} of its step | {rate}, {share:.0%} of step "
                            f"{row['step_row']} | {_met(share >= SHARE_OF_STEP)} |")
        waits = {"end-to-end, default settings": throughput.get("host_waits")}
        waits.update({f"{kind} {name}": row.get("host_waits") for kind in ("model_step", "end_to_end")
                      for name, row in settings.get(kind, {}).items()})
        for name, counted in waits.items():
            if counted and "error" not in counted:
                every = ", ".join(counted["every_step"]) or "none"
                rows.append(f"| host waits per step: 0, {name} | {counted['per_step']:.2f} per step over "
                            f"{counted['steps']} steps; waiting every step: {every} | "
                            f"{_met(not counted['every_step'])} |")
        rows += [f"| {name} | skipped: {reason} | - |" for name, reason in settings.get("skipped", {}).items()]
        rows += [f"| {name} | failed: {error} | - |" for name, error in settings.get("failed", {}).items()]
    if choice is None:
        rows.append("| batch_size.json | missing: no batch-size figures | - |")
    else:
        largest = choice["largest_within_noise"]
        noise = choice["seed_noise"]
        why = f"seed noise {noise:.4f}" if noise is not None else choice.get("why_none", "")
        rows.append(f"| largest batch whose validation SSIM is within the seed noise of batch {choice['reference']} "
                    f"| {largest} ({why}) | - |")
        epochs = (throughput or {}).get("settings", {}).get("end_to_end", {})
        at_largest = epochs.get(f"batch_size={largest}")
        if at_largest is not None:
            ratio = at_largest["vs_original"]
            rows.append(f"| end-to-end epoch >= {VS_ORIGINAL:.0f}x the original recipe at batch {largest} | "
                        f"{ratio:.1f}x ({at_largest['img_s']:,.0f} img/s) | {_met(ratio >= VS_ORIGINAL)} |")
    return rows


def summary(folder: Path) -> str:
    from batch_size import batch_choice, choice_table

    throughput = _read(folder / "train_throughput.json")
    batches = _read(folder / "batch_size.json")
    # A run cut short has quality.py's rows without the choice made from them: made here.
    choice = None if batches is None else batches.get("batch_size") or batch_choice(batches)
    lines = [f"# GPU benchmarks: {folder}", ""]
    if throughput is not None:
        lines += [f"machine: {throughput['machine']}", ""]
    lines += ["| step | status | time | limit |", "|---|---|---|---|", *step_rows(folder), "",
              "| target | measured | met |", "|---|---|---|", *target_rows(throughput, choice)]
    if choice is not None and choice["rows"]:
        lines += ["", choice_table(choice)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python benchmarks/gpu_summary.py OUT_FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    text = summary(folder)
    print(text)
    (folder / "summary.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
