#!/usr/bin/env python3
"""Turns criterion's results of one run of idem's benchmarks into the Markdown tables of
docs/PERFORMANCE.md.

Usage: scripts/bench-report.py [TARGET_DIR]   (default: $CARGO_TARGET_DIR or target)

Reads <target>/criterion/*/*/new/{benchmark,estimates}.json and prints, for each figure, the
median time per operation (criterion's estimate over its samples) and the ratios between
variants measured in the same run.
"""

import json
import os
import sys
from pathlib import Path

STORES = ["memory", "sqlite", "postgres", "mysql", "redis"]


def load(target):
    results = {}
    for bench in Path(target, "criterion").glob("*/*/new/benchmark.json"):
        meta = json.loads(bench.read_text())
        estimates = json.loads((bench.parent / "estimates.json").read_text())
        results[meta["full_id"]] = estimates["median"]["point_estimate"]  # ns per operation
    return results


def fmt_time(ns):
    if ns is None:
        return "—"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns:.0f} ns"


def fmt_ops(ns):
    if ns is None:
        return "—"
    ops = 1e9 / ns
    if ops >= 1e6:
        return f"{ops / 1e6:.2f} M"
    if ops >= 1e4:
        return f"{ops / 1e3:.0f} k"
    if ops >= 1e3:
        return f"{ops / 1e3:.1f} k"
    return f"{ops:.0f}"


def ratio(a, b):
    if a is None or b is None:
        return "—"
    return f"{a / b:.2f}×"


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CARGO_TARGET_DIR", "target")
    r = load(target)
    get = r.get

    print("### New key and replay, one task\n")
    print("| store | op | `#[idempotent]` | store API | hand-written | raw primitive | peer | idem / hand-written | idem / raw | idem / peer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in STORES:
        raw_new = {
            "memory": get(f"{s}/raw/insert"),
            "redis": get(f"{s}/raw/set_nx_px"),
        }.get(s)
        if raw_new is None and get(f"{s}/raw/insert") is not None:
            raw_new = get(f"{s}/raw/insert") + get(f"{s}/raw/update")
        raw_replay = get(f"{s}/raw/get") or get(f"{s}/raw/select")
        for op, raw in (("new_key", raw_new), ("replay", raw_replay)):
            idem = get(f"{s}/{op}/idem")
            if idem is None:
                continue
            api = get(f"{s}/{op}/store_api")
            hand = get(f"{s}/{op}/hand_written")
            peer = get(f"{s}/{op}/peer")
            print(f"| {s} | {op} | {fmt_time(idem)} | {fmt_time(api)} | {fmt_time(hand)} | {fmt_time(raw)} | {fmt_time(peer)} | {ratio(idem, hand)} | {ratio(idem, raw)} | {ratio(idem, peer)} |")

    print("\n### Raw primitives\n")
    print("| store | primitive | time | ops/s |")
    print("|---|---|---|---|")
    for s in STORES:
        for p in ["insert", "update", "select", "get", "set_nx_px"]:
            v = get(f"{s}/raw/{p}")
            if v is not None:
                print(f"| {s} | {p} | {fmt_time(v)} | {fmt_ops(v)} |")

    print("\n### Variants of the handler, one task\n")
    print("| store | new key | without fingerprint | no checkout ping | replay | replay, no checkout ping | replay through `CachedStore` |")
    print("|---|---|---|---|---|---|---|")
    for s in STORES:
        print(f"| {s} | {fmt_time(get(f'{s}/new_key/idem'))} | {fmt_time(get(f'{s}/new_key/idem_no_fingerprint'))} | {fmt_time(get(f'{s}/new_key/idem_no_checkout_ping'))} | {fmt_time(get(f'{s}/replay/idem'))} | {fmt_time(get(f'{s}/replay/idem_no_checkout_ping'))} | {fmt_time(get(f'{s}/replay/idem_cached'))} |")

    print("\n### Concurrency: operations per second of all tasks together\n")
    print("| store | work | 1 task | 8 tasks | 64 tasks | 64 / 1 |")
    print("|---|---|---|---|---|---|")
    for s in STORES:
        for op, who in (("new_key", "idem"), ("new_key", "hand_written"), ("new_key", "peer"), ("replay", "idem"), ("replay", "idem_cached"), ("replay", "peer")):
            one = get(f"{s}/{op}/{who}")
            if one is None:
                continue
            t8 = get(f"{s}/tasks8/{op}/{who}")
            t64 = get(f"{s}/tasks64/{op}/{who}")
            print(f"| {s} | {op} {who} | {fmt_ops(one)} | {fmt_ops(t8)} | {fmt_ops(t64)} | {ratio(one, t64)} |")

    print("\n### Result size, one task\n")
    print("| store | work | 16 B | 1 KiB | 64 KiB | 64 KiB / 16 B |")
    print("|---|---|---|---|---|---|")
    for s in STORES:
        for op, who in (("new_key", "idem"), ("new_key", "hand_written"), ("replay", "idem")):
            small = get(f"{s}/{op}/{who}")
            if small is None:
                continue
            k1 = get(f"{s}/size1KiB/{op}/{who}")
            k64 = get(f"{s}/size64KiB/{op}/{who}")
            print(f"| {s} | {op} {who} | {fmt_time(small)} | {fmt_time(k1)} | {fmt_time(k64)} | {ratio(k64, small)} |")

    print("\n### Strategies against the bare business transaction, one task\n")
    print("| database | bare | claim | tx | claim / bare | tx / bare | bare_version | version | version / bare | bare_state | state | state / bare |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in ["postgres", "mysql", "sqlite"]:
        g = f"{s}_strategies"
        bare, claim, tx = get(f"{g}/bare"), get(f"{g}/claim"), get(f"{g}/tx")
        bv, v = get(f"{g}/bare_version"), get(f"{g}/version")
        bs, st = get(f"{g}/bare_state"), get(f"{g}/state")
        if bare is None:
            continue
        print(f"| {s} | {fmt_time(bare)} | {fmt_time(claim)} | {fmt_time(tx)} | {ratio(claim, bare)} | {ratio(tx, bare)} | {fmt_time(bv)} | {fmt_time(v)} | {ratio(v, bv)} | {fmt_time(bs)} | {fmt_time(st)} | {ratio(st, bs)} |")


if __name__ == "__main__":
    main()
