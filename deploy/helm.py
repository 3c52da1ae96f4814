#!/usr/bin/env python3
"""`helm lint` and `helm template` without the helm binary: Helm's own Go library, bundled
by the PyPI package helm-python-sdk.

    helm.py lint CHART [--strict] [-f VALUES.yaml] [--set-json JSON]
    helm.py template CHART [-f VALUES.yaml] [--set-json JSON] [--name N] [--namespace NS]

`lint` exits 1 on any error (and on warnings with --strict); `template` prints every
rendered manifest as one YAML stream, like `helm template`.
"""
import argparse
import json
import sys

import helm_python as helm
import yaml


def values(args):
    merged = {}
    for path in args.values or []:
        with open(path) as f:
            merge(merged, yaml.safe_load(f) or {})
    for raw in args.set_json or []:
        merge(merged, json.loads(raw))
    return merged


def merge(into, more):
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def main():
    parser = argparse.ArgumentParser(prog="helm.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("lint", "template"):
        p = sub.add_parser(name)
        p.add_argument("chart")
        p.add_argument("-f", "--values", action="append")
        p.add_argument("--set-json", action="append")
        if name == "lint":
            p.add_argument("--strict", action="store_true")
        else:
            p.add_argument("--name", default="chat")
            p.add_argument("--namespace", default="chat")
    args = parser.parse_args()

    if args.command == "lint":
        report = helm.lint(args.chart, values(args), strict=args.strict)
        worst = 0
        for m in report["messages"]:
            level = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m["severity"], "UNKNOWN")
            print(f"[{level}] {m['path']}: {m['error']}")
            worst = max(worst, m["severity"])
        for error in report["errors"]:
            print(f"[ERROR] {error}")
        failed = report["errors"] or worst >= 3 or (args.strict and worst >= 2)
        print(f"{report['total_charts_linted']} chart(s) linted, {'failed' if failed else 'no failures'}")
        sys.exit(1 if failed else 0)

    with helm.Chart.load(args.chart) as chart:
        chart.validate_schema(values(args))
        rendered = chart.render(values(args), name=args.name, namespace=args.namespace, is_install=True)
    for path in sorted(rendered):
        body = rendered[path].strip()
        if not body or path.endswith("NOTES.txt"):
            continue
        print(f"---\n# Source: {path}\n{body}")


if __name__ == "__main__":
    main()
