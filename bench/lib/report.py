"""Medians, ratios, the targets of the benchmark issue, the table and the chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .proc import QUIET_MAX_WAIT

# (key, label); the key's prefix is the group: cold pull+mount, warm mount, pack+push.
SCENARIOS: list[tuple[str, str]] = [
    ("cold/imagevol-oras", "imagevol mount, ORAS artifact"),
    ("cold/imagevol-pack-artifact", "imagevol mount, pack artifact"),
    ("cold/imagevol-pack-image", "imagevol mount, pack image (tar)"),
    ("cold/imagevol-targz", "imagevol mount, umoci tar+gzip image"),
    ("cold/oras-pull", "oras-py pull (ORAS artifact)"),
    ("cold/skopeo-umoci", "skopeo copy + umoci raw unpack (tar+gzip)"),
    ("cold/limit", "one-pass limit (fetch + sha256)"),
    ("warm/imagevol-oras", "imagevol mount warm, ORAS artifact"),
    ("warm/imagevol-pack-artifact", "imagevol mount warm, pack artifact"),
    ("warm/imagevol-pack-image", "imagevol mount warm, pack image"),
    ("warm/imagevol-targz", "imagevol mount warm, tar+gzip image"),
    ("push/imagevol-artifact", "imagevol pack --format artifact + push"),
    ("push/imagevol-image", "imagevol pack --format image + push"),
    ("push/oras-push", "oras-py push"),
]
LABELS = dict(SCENARIOS)
GROUPS = {"cold": "cold pull + mount (empty store)", "warm": "warm mount (content present)", "push": "pack + push"}
RSS_LIMIT_MB = 150  # 150 MB = 150e6 bytes


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, rs in runs.items():
        if not rs:
            continue
        secs = [r["seconds"] for r in rs]
        rss = [r["rss_mib"] for r in rs if r.get("rss_mib") is not None]
        d: dict[str, Any] = {
            "median_s": round(statistics.median(secs), 4),
            "min_s": round(min(secs), 4),
            "max_s": round(max(secs), 4),
            "n": len(secs),
        }
        d["busy_machine_runs"] = sum(1 for r in rs if r.get("quiet") is False)
        if rss:
            d["peak_rss_mib_max"] = round(max(rss), 1)
            d["peak_rss_mib_median"] = round(statistics.median(rss), 1)
        for extra in (
            "cpu_s",
            "registry_cpu_s",
            "other_cpu_s",
            "load_before",
            "pull_s",
            "materialize_and_mount_s",
            "in_process_s",
            "skopeo_s",
            "umoci_s",
        ):
            vals = [r[extra] for r in rs if isinstance(r.get(extra), int | float)]
            if vals:
                d[f"median_{extra}"] = round(statistics.median(vals), 4)
        out[key] = d
    return out


def _ratio(med: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    if a in med and b in med and med[b]["median_s"] > 0:
        return med[a]["median_s"] / med[b]["median_s"]
    return None


def targets(
    med: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]], size_mib: int
) -> list[dict[str, Any]]:
    """Each target of the issue: value, threshold, met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, threshold: float, unit: str = "x") -> None:
        met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        out.append(
            {
                "target": name,
                "value": None if value is None else round(value, 3),
                "op": op,
                "threshold": threshold,
                "unit": unit,
                "met": met,
            }
        )

    for src in ("oras", "pack-artifact"):
        add(
            f"cold pull+mount of the raw {src} artifact vs one-pass limit (imagevol / limit)",
            _ratio(med, f"cold/imagevol-{src}", "cold/limit"),
            "<=",
            1.3,
        )
    for src in ("oras", "pack-artifact"):
        add(
            f"cold pull+mount of the raw {src} artifact vs oras pull (oras / imagevol)",
            _ratio(med, "cold/oras-pull", f"cold/imagevol-{src}"),
            ">=",
            2.0,
        )
    add(
        "cold pull+mount of the tar+gzip image vs skopeo+umoci (skopeo+umoci / imagevol)",
        _ratio(med, "cold/skopeo-umoci", "cold/imagevol-targz"),
        ">=",
        4.0,
    )
    warm = [k for k in med if k.startswith("warm/")]
    if warm:
        add(
            "warm mount, whole process (slowest median of the references)",
            max(med[k]["median_s"] for k in warm),
            "<=",
            0.3,
            "s",
        )
        unchanged = all(r.get("store_unchanged") for k in warm for r in runs[k])
        out.append(
            {
                "target": "warm mount wrote no file data (blobs/ and snapshots/ unchanged, every run)",
                "value": unchanged,
                "op": "==",
                "threshold": True,
                "unit": "",
                "met": unchanged,
            }
        )
    for fmt in ("artifact", "image"):
        add(
            f"pack+push --format {fmt} vs oras push (oras / imagevol)",
            _ratio(med, "push/oras-push", f"push/imagevol-{fmt}"),
            ">=",
            2.0,
        )
    iv = [r["rss_mib"] for k, rs in runs.items() if "imagevol" in k for r in rs if r.get("rss_mib") is not None]
    if iv:
        add(
            f"peak RSS of any imagevol command at {size_mib} MiB (MB = 1e6 bytes)",
            max(iv) * (1 << 20) / 1e6,
            "<=",
            RSS_LIMIT_MB,
            "MB",
        )
    return out


def table(med: dict[str, dict[str, Any]], size_mib: int) -> str:
    """Medians, throughput and ratios, as a Markdown table."""
    lines = [
        "| scenario | median s | MiB/s | min-max s | CPU s (registry) | others' CPU s | peak RSS MiB | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    limit = med.get("cold/limit", {}).get("median_s")
    for key, label in SCENARIOS:
        d = med.get(key)
        if d is None:
            continue
        s = d["median_s"]
        rate = f"{size_mib / s:.0f}" if not key.startswith("warm/") and s > 0 else ""
        ratio = ""
        if key.startswith("cold/imagevol"):
            parts = []
            if limit:
                parts.append(f"{s / limit:.2f} x limit")
            peer = "cold/skopeo-umoci" if key.endswith("targz") else "cold/oras-pull"
            if peer in med:
                parts.append(f"{med[peer]['median_s'] / s:.1f} x faster than {peer.split('/')[1]}")
            ratio = ", ".join(parts)
        elif key.startswith("push/imagevol") and "push/oras-push" in med:
            ratio = f"{med['push/oras-push']['median_s'] / s:.1f} x faster than oras push"
        elif key in ("cold/oras-pull", "cold/skopeo-umoci") and limit:
            ratio = f"{s / limit:.2f} x limit"
        rss = f"{d['peak_rss_mib_max']:.0f}" if "peak_rss_mib_max" in d else ""
        cpu = f"{d['median_cpu_s']:.2f}" if "median_cpu_s" in d else ""
        if d.get("median_registry_cpu_s") and not key.startswith("warm/"):
            cpu += f" ({d['median_registry_cpu_s']:.1f})"
        other = f"{d['median_other_cpu_s']:.2f}" if "median_other_cpu_s" in d else ""
        span = f"{d['min_s']:.2f}-{d['max_s']:.2f}"
        lines.append(f"| {label} | {s:.2f} | {rate} | {span} | {cpu} | {other} | {rss} | {ratio} |")
    return "\n".join(lines)


def noise_text(med: dict[str, dict[str, Any]]) -> str:
    busy = sum(d.get("busy_machine_runs", 0) for d in med.values())
    total = sum(d["n"] for d in med.values())
    return (
        f"{busy} of {total} runs had to start on a machine still busy elsewhere after waiting "
        f"{int(QUIET_MAX_WAIT)} s for quiet (their others' CPU shows how busy)"
    )


def targets_text(ts: list[dict[str, Any]]) -> str:
    lines = []
    for t in ts:
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        v = t["value"]
        v = "" if v is None else (f"{v:.3g} {t['unit']}".strip() if isinstance(v, float) else str(v))
        lines.append(f"- {state:7} {t['target']}: {v} (target {t['op']} {t['threshold']} {t['unit']})".rstrip())
    return "\n".join(lines)


def chart(med: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars of medians (min-max whiskers) per group, plus peak RSS of the imagevol runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUPS if any(k.startswith(g + "/") for k in med)]
    rows = [[(k, lab) for k, lab in SCENARIOS if k.startswith(g + "/") and k in med] for g in groups]
    rss_rows = [(k, lab) for k, lab in SCENARIOS if k in med and "peak_rss_mib_max" in med[k]]
    heights = [len(r) + 1.2 for r in rows] + [len(rss_rows) * 0.55 + 1.2]
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(9.5, 0.42 * sum(heights) + 1.2), gridspec_kw={"height_ratios": heights}
    )
    for ax, g, rs in zip(axes, groups, rows, strict=False):
        labels = [lab for _, lab in rs]
        vals = [med[k]["median_s"] for k, _ in rs]
        lo = [med[k]["median_s"] - med[k]["min_s"] for k, _ in rs]
        hi = [med[k]["max_s"] - med[k]["median_s"] for k, _ in rs]
        colors = ["#1f77b4" if "imagevol" in k else ("#7f7f7f" if k.endswith("limit") else "#ff7f0e") for k, _ in rs]
        y = range(len(rs))
        ax.barh(y, vals, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(list(y), labels, fontsize=8.5)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median, whiskers min-max)", fontsize=8)
        ax.set_title(GROUPS[g], fontsize=10, loc="left")
        top = max(v + h for v, h in zip(vals, hi, strict=True)) or 1
        ax.set_xlim(0, top * 1.22)
        for i, (v, h) in enumerate(zip(vals, hi, strict=True)):
            ax.text(v + h + top * 0.01, i, f"{v:.2f} s", va="center", fontsize=8)
        if g == "warm":
            ax.axvline(0.3, color="red", lw=1, ls="--")
            ax.text(0.3, -0.6, " target 0.3 s", color="red", fontsize=7.5, va="bottom")
        ax.tick_params(axis="x", labelsize=8)
    ax = axes[-1]
    labels = [lab for _, lab in rss_rows]
    vals = [med[k]["peak_rss_mib_max"] * (1 << 20) / 1e6 for k, _ in rss_rows]
    colors = ["#1f77b4" if "imagevol" in k else ("#7f7f7f" if k.endswith("limit") else "#ff7f0e") for k, _ in rss_rows]
    ax.barh(range(len(vals)), vals, color=colors, height=0.6)
    ax.set_yticks(range(len(vals)), labels, fontsize=7.5)
    ax.invert_yaxis()
    ax.axvline(RSS_LIMIT_MB, color="red", lw=1, ls="--")
    ax.set_title(
        f"peak RSS, MB, log scale (max over rounds; imagevol target {RSS_LIMIT_MB} MB)", fontsize=10, loc="left"
    )
    ax.set_xscale("log")
    ax.set_xlim(10, max([*vals, RSS_LIMIT_MB]) * 2)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=7.5)
    ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
