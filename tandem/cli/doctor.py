"""`tandem doctor`: which build targets and runtimes can run on this machine, and why not."""

from __future__ import annotations

import argparse

from tandem.cli.common import add_json_argument, finish


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="list which build targets and runtimes can run here, and why not")
    p.add_argument("--config", help="also check whether this config fits in memory for export, train and inference")
    add_json_argument(p)
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from tandem.config import load_config
    from tandem.preflight import doctor_checks

    checks = doctor_checks(load_config(args.config) if args.config else None)
    for section, items in checks.items():
        print(f"{section}:")
        for check in items:
            print(f"  {'yes' if check.ok else 'no ':<4} {check.name:<18} {check.detail}")
    return finish(args, {section: [c.as_dict() for c in items] for section, items in checks.items()})
