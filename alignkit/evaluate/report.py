"""One self-contained HTML page of an evaluation: the policies' numbers, the arena, the plots.

    from alignkit.evaluate.report import write_report
    write_report("runs/demo")          # a demo run -> runs/demo/report/report.html (+ report.json)

    alignkit eval ... --report runs/cmp  # any policies -> runs/cmp/report.html (render_report)

`render_report` draws the page from an eval result (eval.json's dict) and the training
logs (metrics.jsonl records) of whichever runs have one; `write_report` gathers those
from a demo's run directory and adds its stage table. Plots are matplotlib PNGs embedded
as base64, so the page opens anywhere without its folder. The demo's report.json holds
every number the page shows.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def read_metrics(folder: str | Path) -> list[dict]:
    """A run folder's metrics.jsonl records ([] when it has none, e.g. a Hub model id)."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [s for s, _ in points], [v for _, v in points]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def reward_keys(history: list[dict]) -> tuple[str | None, str | None]:
    """The proxy (optimised) and gold (watched) reward keys of an online run's log."""
    sources = sorted({k for h in history for k in h if k.startswith("train/reward/")})
    gold = next((k for k in sources if "gold" in k or "exact_match" in k), None)
    proxy = next((k for k in sources if k != gold), None)
    return proxy or ("train/reward" if any("train/reward" in h for h in history) else None), gold


def is_online(history: list[dict]) -> bool:
    """Whether a training log is an online RL run's (PPO, GRPO, RLOO log the reward of their samples)."""
    return any("train/reward" in h for h in history)


def plot_online(runs: dict[str, list[dict]]) -> str | None:
    """Proxy and gold reward over training for each online run: over-optimisation shows as a gap."""
    plt = _pyplot()
    runs = {k: v for k, v in runs.items() if is_online(v)}
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, history in runs.items():
        proxy, gold = reward_keys(history)
        if proxy:
            line, = axes[0].plot(*_series(history, proxy), label=f"{name} proxy (reward model)")
            if gold:
                axes[0].plot(*_series(history, gold), "--", color=line.get_color(), label=f"{name} gold")
        kl_key = "train/kl_per_completion"
        if any(kl_key in h for h in history):
            axes[1].plot(*_series(history, kl_key), label=name)
    axes[0].set(title="reward during training (solid: optimised, dashed: gold)", xlabel="step", ylabel="reward")
    axes[1].set(title="KL to the run's reference model", xlabel="step", ylabel="nats per completion")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def plot_offline(runs: dict[str, list[dict]]) -> str | None:
    """Training loss of every offline run (pretraining, SFT, reward model, DPO, KTO, ...) that logs one."""
    plt = _pyplot()
    runs = {k: v for k, v in runs.items() if not is_online(v) and any("train/loss" in h for h in v)}
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, history in runs.items():
        ax.plot(*_series(history, "train/loss"), label=name)
    ax.set(title="training loss", xlabel="step", ylabel="loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_frontier(models: dict[str, dict], reference: str, curve: list[dict] | None = None) -> str:
    """Gold reward against KL to the reference: the DPO paper's frontier, one point per policy (hollow: flagged by
    the over-optimisation monitor), and what the task allows: best-of-n by gold from the reference at its KL bound."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    if curve:
        ax.plot([c["kl_bound"] for c in curve], [c["gold"] for c in curve], "k--", alpha=0.6,
                label=f"best-of-n by gold from {reference} (KL bound)")
        for c in curve:
            ax.annotate(f"n={c['n']}", (c["kl_bound"], c["gold"]), fontsize=7, color="0.4", xytext=(-4, 5),
                        textcoords="offset points", ha="right")
    for family in ("dpo", "ppo"):
        members = sorted((m["kl"], m["gold"], n) for n, m in models.items() if n == family or n.startswith(family + "-"))
        if len(members) > 1:
            ax.plot([k for k, _, _ in members], [g for _, g, _ in members], "-", alpha=0.4)
    for i, (name, m) in enumerate(models.items()):
        flags, color = m.get("flags"), f"C{i % 10}"
        ax.scatter(m["kl"], m["gold"], s=30, facecolors="none" if flags else color, edgecolors=color)
        ax.annotate(name + (f" ({', '.join(flags)})" if flags else ""), (m["kl"], m["gold"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set(title=f"gold reward vs KL to {reference}", xlabel="KL (nats per completion, sampled)",
           ylabel="mean gold reward")
    if curve:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_leaderboard(board: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(board) + 1))
    names = [r["model"] + (f" ({', '.join(r['flags'])})" if r.get("flags") else "") for r in board][::-1]
    bt = [r["bt"] for r in board][::-1]
    err = [[r["bt"] - r["bt_low"] for r in board][::-1], [r["bt_high"] - r["bt"] for r in board][::-1]]
    ax.errorbar(bt, range(len(names)), xerr=err, fmt="o", capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.set(title="Bradley-Terry rating (95% bootstrap interval)", xlabel="rating (Elo scale)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}h2{margin-top:1.6em}.samples td{text-align:left}"""


def render_report(out: str | Path, title: str, result: dict | None, histories: dict[str, list[dict]],
                  stages: dict[str, dict] | None = None) -> Path:
    """Write out/report.html and return its path; nothing else in `out` is touched.

    result: an eval result (`evaluate`'s return, eval.json) or None; histories: run name ->
    its metrics.jsonl records, for the training curves; stages: stage name -> its summary
    (the demo's stage table; None = no such table).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if stages:
        parts.append("<h2>Stages</h2>" + _table(["stage", "seconds", "summary"], [
            [name, _fmt(s.get("seconds"), ".0f"),
             ", ".join(f"{k}={_fmt(v, '.3g') if isinstance(v, float) else v}" for k, v in s.items()
                       if k not in ("seconds", "table"))]
            for name, s in stages.items()]))
        # a stage may carry a table of its own: {"title", "headers", "rows"} (the search comparison)
        for s in stages.values():
            if isinstance(s.get("table"), dict):
                parts.append(f"<h2>{html.escape(s['table']['title'])}</h2>"
                             + _table(s["table"]["headers"], s["table"]["rows"]))
    images = {}
    if result:
        models = result["models"]
        cols = [("gold", "+.3f"), ("proxy", "+.3f"), ("kl", ".2f"), ("kl_per_token", ".3f"), ("win_rate", ".2f"),
                ("length", ".1f"), ("ended", ".2f"), ("distinct_1", ".2f"), ("distinct_2", ".2f"),
                ("entropy", ".2f"), ("text_nll", ".3f")]
        cols = [(c, f) for c, f in cols if any(c in m for m in models.values())]
        ref = html.escape(result["reference"])
        meanings = {"gold": "gold: the judging reward (an honest judge when no model trained on it)",
                    "proxy": "proxy: the reward model", "kl": f"kl: sampled KL to {ref} in nats per completion",
                    "win_rate": f"win_rate: against {ref}, judged by the gold reward",
                    "entropy": "distinct/entropy: diversity (mode collapse drives them down)",
                    "text_nll": "text_nll: held-out pretraining text (alignment tax when it rises)"}
        parts.append(f"<h2>Policies on {result['prompts']} held-out prompts</h2>"
                     f"<p>{'; '.join(meanings[c] for c, _ in cols if c in meanings)}.</p>")
        flagged = any(m.get("flags") for m in models.values())
        parts.append(_table(["policy"] + [c for c, _ in cols] + (["flags"] if flagged else []),
                            [[n] + [_fmt(m.get(c), f) for c, f in cols] + ([", ".join(m.get("flags", []))]
                                                                            if flagged else [])
                             for n, m in models.items()]))
        if flagged:
            parts.append("<p>Flags, the over-optimisation monitor (against the reference): <b>collapsed</b>, "
                         "distinct_2 fell well below the reference's (mode collapse); <b>unended</b>, far fewer "
                         "completions end with EOS; <b>over-optimised</b>, the proxy rose while gold fell (in the "
                         "table, or in the run's training log).</p>")
        images["frontier"] = plot_frontier(models, result["reference"], result.get("reference_best_of_n"))
        if result.get("kl_budgets"):
            parts.append("<h2>At a KL budget</h2><p>The best unflagged policy by gold within K nats of "
                         f"{ref}; beside it, what best-of-n by the gold reward from {ref} reaches within the same "
                         "bound (where it was measured).</p>")
            parts.append(_table(["KL budget", "policy", "gold", "kl", "best-of-n by gold", "flagged, higher gold"], [
                [f"{b['kl_budget']:g}", b["model"] or "none", _fmt(b["gold"], "+.3f"), _fmt(b["kl"], ".2f"),
                 (f"n={b['reference_best_of_n']['n']}: {b['reference_best_of_n']['gold']:+.3f}"
                  if b.get("reference_best_of_n") else "-"), ", ".join(b["flagged_above"])]
                for b in result["kl_budgets"]]))
        if result["leaderboard"]:
            parts.append("<h2>Arena</h2><p>Every two policies on every prompt, judged by the gold reward. "
                         "Bradley-Terry maximum likelihood with 95% bootstrap intervals; online Elo beside it.</p>")
            parts.append(_table(["rank", "policy", "BT rating", "95% interval", "Elo", "win rate", "battles", "flags"], [
                [i, r["model"], f"{r['bt']:.0f}", f"{r['bt_low']:.0f} to {r['bt_high']:.0f}", f"{r['elo']:.0f}",
                 f"{r['win_rate']:.2f}", r["battles"], ", ".join(r.get("flags", []))]
                for i, r in enumerate(result["leaderboard"], 1)]))
            images["leaderboard"] = plot_leaderboard(result["leaderboard"])
    images["online"] = plot_online(histories)
    images["training_loss"] = plot_offline(histories)
    titles = {"frontier": "Reward vs KL frontier", "leaderboard": "Leaderboard",
              "online": "Proxy vs gold reward during online RL (over-optimisation)", "training_loss": "Training loss"}
    for key, title in titles.items():
        if images.get(key):
            parts.append(f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{images[key]}'>")
    if result and result["samples"]:
        names = list(result["models"])
        parts.append("<h2>Samples side by side</h2><table class='samples'><tr><th>prompt</th>"
                     + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")
        for s in result["samples"]:
            parts.append("<tr><td>" + html.escape(s["prompt"]) + "</td>" + "".join(
                f"<td>{html.escape(s[n])}<br><small>gold {s[f'{n}/gold']:+.2f}</small></td>" for n in names) + "</tr>")
        parts.append("</table>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"


def write_report(root: str | Path) -> Path:
    """Write root/report/report.html and report.json from a demo's run directory; returns the HTML path."""
    root = Path(root)
    eval_path = root / "eval" / "eval.json"
    result = json.loads(eval_path.read_text()) if eval_path.exists() else None
    stages = {p.name: json.loads((p / "stage.json").read_text())
              for p in sorted(root.iterdir()) if (p / "stage.json").exists()}
    histories = {p.name: read_metrics(p) for p in sorted(root.iterdir()) if (p / "metrics.jsonl").exists()}
    path = render_report(root / "report", f"alignkit demo: {root}", result, histories, stages)
    (root / "report" / "report.json").write_text(json.dumps({"stages": stages, "eval": result, "histories": histories},
                                                            indent=1))
    return path
