"""Sweeps chatoy-bench's `fanout` over offered loads and draws one SVG chart of the results.

Called by scripts/bench-chart (see its --help). Python 3.11 standard library only: the SVG is
written by hand. Two panels share the x axis (offered load, msg/s over all senders): delivered
`recv`/s (with the ideal, offered x receivers per message, dashed), and delivery latency p99
(p50 lighter). A point whose run reported problems (loss, errors, a busy machine) is drawn as a
hollow red ring and listed under the chart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_loads(text: str) -> list[float]:
    loads = [float(part) for part in text.replace(",", " ").split()]
    if not loads or any(not math.isfinite(x) or x <= 0 for x in loads):
        raise argparse.ArgumentTypeError("loads must be positive numbers, e.g. 1000,2000,5000")
    return sorted(set(loads))


def sweep(args: argparse.Namespace) -> None:
    """Runs one `fanout` per offered load and writes each report to the output directory."""
    if not args.url:
        sys.exit("bench-chart: no server: set CHATOY_URL (and CHATOY_PID) or pass --url")
    bench = args.bench
    if bench is None:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        if not target.is_absolute():
            target = ROOT / target
        bench = target / "release" / "chatoy-bench"
    if not Path(bench).is_file():
        sys.exit(f"bench-chart: no {bench}; build it with `cargo build --release -p chatoy-bench` or pass --bench")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    senders_total = args.rooms * args.senders
    for load in args.loads:
        per_sender = load / senders_total
        messages = max(1, math.ceil(per_sender * args.seconds))
        report = out / f"fanout-{int(load):09d}.json"
        command = [
            str(bench), "--url", args.url, "--quiet", "--json", str(report),
            "fanout", "--rooms", str(args.rooms), "--members", str(args.members),
            "--senders", str(args.senders), "--window", str(args.window),
            "--messages", str(messages), "--rate", f"{per_sender:.6g}",
        ]
        if args.pid:
            command[1:1] = ["--pid", str(args.pid)]
        command += args.extra
        print(f"bench-chart: offered {load:g} msg/s: {' '.join(command)}", file=sys.stderr, flush=True)
        status = subprocess.run(command, check=False).returncode
        if status not in (0, 2):
            sys.exit(f"bench-chart: chatoy-bench exited with status {status} at {load:g} msg/s")


def load_points(directory: Path) -> list[dict]:
    """Reads every paced `fanout` report of `directory`, sorted by offered load."""
    points = []
    for path in sorted(directory.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"bench-chart: skipping {path}: {err}", file=sys.stderr)
            continue
        if report.get("scenario") != "fanout" or "fanout" not in report:
            continue
        params, result = report["params"], report["fanout"]
        if not params.get("rate"):
            print(f"bench-chart: skipping {path}: unpaced (no --rate), no offered load", file=sys.stderr)
            continue
        points.append({
            "file": path.name,
            "offered": params["rate"] * params["senders"] * params["rooms"],
            "ideal": params["rate"] * params["senders"] * params["rooms"] * (params["members"] - 1),
            "recv_per_sec": result["recv_per_sec"],
            "p99_ms": result["delivery_latency"]["p99_us"] / 1000,
            "p50_ms": result["delivery_latency"]["p50_us"] / 1000,
            "problems": report.get("problems", []),
            "params": params,
            "cpu": report.get("cpu", {}),
        })
    points.sort(key=lambda p: p["offered"])
    return points


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `top`."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = [0.0]
    while ticks[-1] < top - 1e-9 * top:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def human(value: float) -> str:
    """1234567 -> 1.23M, 2500 -> 2.5k."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            text = f"{value / limit:.2f}".rstrip("0").rstrip(".")
            return text + suffix
    return f"{value:.3g}" if value % 1 else f"{value:.0f}"


def render(points: list[dict], title: str) -> str:
    """The chart as an SVG document."""
    width, left, right = 860, 90, 30
    top, panel, gap, bottom = 84, 220, 76, 60
    notes = []
    for p in points:
        if p["problems"]:
            text = f"{human(p['offered'])} msg/s ({p['file']}): " + "; ".join(p["problems"])
            notes += textwrap.wrap(text, 125, subsequent_indent="    ")
    height = top + 2 * panel + gap + bottom + 16 * len(notes)
    plot_w = width - left - right
    x_max = max(p["offered"] for p in points) * 1.05
    x_ticks = nice_ticks(x_max)
    x_scale = plot_w / x_ticks[-1]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{escape(title)}</text>',
    ]
    subtitle = (
        f"chatoy-bench fanout, paced senders; {len(points)} runs; x = offered msg/s over all senders"
    )
    out.append(f'<text x="{width / 2}" y="44" text-anchor="middle" fill="#555">{escape(subtitle)}</text>')

    def x_of(value: float) -> float:
        return left + value * x_scale

    def panel_frame(y0: float, y_ticks: list[float], y_label: str, fmt) -> float:
        scale = panel / y_ticks[-1]
        for tick in y_ticks:
            y = y0 + panel - tick * scale
            out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e4e4e4"/>')
            out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{fmt(tick)}</text>')
        for tick in x_ticks:
            x = x_of(tick)
            out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + panel}" stroke="#f0f0f0"/>')
            out.append(f'<text x="{x:.1f}" y="{y0 + panel + 16}" text-anchor="middle">{human(tick)}</text>')
        out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" fill="none" stroke="#888"/>')
        out.append(
            f'<text transform="translate(22 {y0 + panel / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>'
        )
        return scale

    def line(y0: float, scale: float, key: str, colour: str, dash: str = "", dots: bool = True) -> None:
        coords = [(x_of(p["offered"]), y0 + panel - p[key] * scale) for p in points]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{extra}/>')
        if not dots:
            return
        for (x, y), p in zip(coords, points):
            if p["problems"]:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="white" stroke="#d62728" stroke-width="2"/>')
            else:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>')

    def legend(y0: float, items: list[tuple[str, str, str]]) -> None:
        """A row of line samples just above the panel."""
        x = left
        for label, colour, dash in items:
            extra = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{x}" y1="{y0 - 12}" x2="{x + 22}" y2="{y0 - 12}" stroke="{colour}" stroke-width="2"{extra}/>')
            out.append(f'<text x="{x + 28}" y="{y0 - 8}">{escape(label)}</text>')
            x += 34 + 7 * len(label)

    # Top panel: throughput.
    y0 = top
    y_top = max(max(p["recv_per_sec"] for p in points), max(p["ideal"] for p in points)) * 1.05
    scale = panel_frame(y0, nice_ticks(y_top), "delivered recv/s", human)
    line(y0, scale, "ideal", "#999", dash="5,4", dots=False)
    line(y0, scale, "recv_per_sec", "#1f77b4")
    legend(y0, [("delivered recv/s", "#1f77b4", ""), ("offered x receivers", "#999", "5,4")])

    # Bottom panel: delivery latency.
    y0 = top + panel + gap
    y_top = max(p["p99_ms"] for p in points) * 1.1
    scale = panel_frame(y0, nice_ticks(y_top), "delivery latency (ms)", lambda v: f"{v:g}")
    line(y0, scale, "p50_ms", "#ffbb78")
    line(y0, scale, "p99_ms", "#ff7f0e")
    legend(y0, [("delivery p99", "#ff7f0e", ""), ("delivery p50", "#ffbb78", ""),
                ("hollow red: the run reported problems (listed below)", "#d62728", "2,3")])
    out.append(
        f'<text x="{left + plot_w / 2}" y="{y0 + panel + 38}" text-anchor="middle">offered load (msg/s, all senders)</text>'
    )

    y = y0 + panel + 62
    for text in notes:
        out.append(f'<text x="{left}" y="{y}" fill="#d62728" font-size="11">{escape(text)}</text>')
        y += 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


def default_title(points: list[dict]) -> str:
    params = points[0]["params"]
    shapes = {(p["params"]["rooms"], p["params"]["members"], p["params"]["senders"], p["params"]["window"]) for p in points}
    if len(shapes) > 1:
        print("bench-chart: warning: the reports mix room shapes; the title names the first", file=sys.stderr)
    rooms = params["rooms"]
    return (
        f"Fan-out: {rooms} room{'s' if rooms != 1 else ''} of {params['members']} members, "
        f"{params['senders']} senders, window {params['window']}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bench-chart",
        description="Sweep chatoy-bench fanout over offered loads and draw one SVG chart "
        "(delivered recv/s and delivery p99 against offered msg/s).",
    )
    parser.add_argument("--url", default=os.environ.get("CHATOY_URL"), help="server URL (default $CHATOY_URL)")
    parser.add_argument("--pid", default=os.environ.get("CHATOY_PID"), help="server pid (default $CHATOY_PID)")
    parser.add_argument("--loads", type=parse_loads, default=parse_loads("1000,2000,5000,10000,20000,30000,40000"),
                        help="offered loads in msg/s over all senders (default 1000,2000,5000,10000,20000,30000,40000)")
    parser.add_argument("--rooms", type=int, default=1)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--senders", type=int, default=10, help="senders per room")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run (default 5)")
    parser.add_argument("--out", default="bench-chart-out", help="directory of the JSON reports (default bench-chart-out)")
    parser.add_argument("--svg", default=str(ROOT / "docs" / "bench-fanout.svg"), help="the chart (default docs/bench-fanout.svg)")
    parser.add_argument("--title", help="chart title (default: the room shape)")
    parser.add_argument("--bench", help="chatoy-bench binary (default $CARGO_TARGET_DIR or target, release)")
    parser.add_argument("--render-only", metavar="DIR", help="draw the chart from the reports in DIR; run nothing")
    parser.add_argument("extra", nargs="*", help="after --: more chatoy-bench flags (e.g. -- --threads 1)")
    args = parser.parse_args(argv)
    if args.rooms < 1 or args.senders < 1 or args.members < 2 or args.window < 1 or args.seconds <= 0:
        parser.error("--rooms, --senders, --window must be >= 1, --members >= 2, --seconds > 0")

    directory = Path(args.render_only or args.out)
    if not args.render_only:
        sweep(args)
    points = load_points(directory)
    if not points:
        print(f"bench-chart: no paced fanout reports in {directory}", file=sys.stderr)
        return 1
    svg = Path(args.svg)
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(render(points, args.title or default_title(points)))
    for p in points:
        flag = "  PROBLEMS: " + "; ".join(p["problems"]) if p["problems"] else ""
        print(f"offered {human(p['offered']):>6} msg/s  delivered {human(p['recv_per_sec']):>6} recv/s  "
              f"p50 {p['p50_ms']:.3f} ms  p99 {p['p99_ms']:.3f} ms{flag}")
    print(f"bench-chart: wrote {svg} from {len(points)} reports in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
