"""`signer cluster ...`: the operator's cluster commands, sent to the running signer's control
socket (signer/server/control.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from signer.errors import SignerError
from signer.server.control import call

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signer cluster",
        description="inspect and change the replicated cluster of the signer running on this host",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the signer's YAML file (finds the socket)")
    where.add_argument("--socket", type=Path, help="the signer's control socket")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="role, leader, peers, lag, quorum, snapshot, clocks")
    add = sub.add_parser("add", help="add a new (empty) signer as a voter; then start it")
    add.add_argument("address", help="the new signer's IP:port on the replication link")
    remove = sub.add_parser("remove", help="remove a voter while the cluster has quorum")
    remove.add_argument("address", help="the voter's IP:port")
    force = sub.add_parser(
        "force-standalone",
        help="continue alone after the other signer was fenced (powered off, unplugged)",
    )
    sub.add_parser(
        "recover",
        help="signer stopped, every signer lost: restart replication from this repository "
        "(restored from a backup) with this signer alone",
    )
    force.add_argument(
        "--fenced",
        action="append",
        required=True,
        metavar="ADDRESS",
        help="each other voter, confirming it is fenced and can never run again as is",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "recover":
        return _recover(args)
    try:
        path = args.socket or _socket_from_config(args.config)
    except Exception as exc:  # ConfigError and friends
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"cmd": args.command.replace("-", "_")}
    if args.command in ("add", "remove"):
        request["address"] = args.address
    if args.command == "force-standalone":
        request["fenced"] = args.fenced
    try:
        answer = call(path, request)
    except (OSError, ValueError) as exc:
        print(f"error: cannot reach the signer on {path}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif answer.get("ok"):
        _show(answer["result"], "")
    else:
        error = answer.get("error", {})
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
    return EXIT_OK if answer.get("ok") else EXIT_REFUSED


def _recover(args: argparse.Namespace) -> int:
    """Offline: the signer must not run (its socket must not answer)."""
    from replication.errors import ReplicationError
    from replication.raft import RaftLog
    from signer.config import ConfigError, load
    from signer.server.config import SignerConfig
    from storage import Repository, RepositoryError

    try:
        if args.config is None:
            raise ConfigError("recover needs --config (the signer's YAML file)")
        config = load(args.config, SignerConfig)
        if config.replication is None or config.repository is None:
            raise ConfigError(f"{args.config}: needs the replication and repository sections")
        try:
            call(config.replication.socket_path, {"cmd": "status"}, timeout=2)
        except (OSError, ValueError):
            pass
        else:
            raise ConfigError("the signer is running: stop it before recovering")
        repository = Repository(config.repository.path, config.repository.map_size_gb << 30)
        try:
            generation = RaftLog(config.replication, repository).recover_standalone()
        finally:
            repository.close()
    except (ConfigError, SignerError, ReplicationError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"recovered: this signer alone, generation {generation}; start it, then add the others")
    return EXIT_OK


def _socket_from_config(path: Path) -> Path:
    from signer.config import ConfigError, load
    from signer.server.config import SignerConfig

    config = load(path, SignerConfig)
    if config.replication is None:
        raise ConfigError(f"{path}: no replication section: this signer is not in a cluster")
    return config.replication.socket_path


def _show(value: Any, indent: str) -> None:
    for key, item in value.items():
        if isinstance(item, dict):
            print(f"{indent}{key}:")
            _show(item, indent + "  ")
        else:
            print(f"{indent}{key}: {item}")
