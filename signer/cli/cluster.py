"""`signer cluster ...`: the operator's cluster commands, sent to the running signer's control
socket (signer/server/control.py), and the offline `recover` (signer host)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from signer.cli.common import EXIT_OK, CommandFailed, print_json, show_mapping
from signer.errors import ConfigError, Unreachable

HELP = "status and membership of the replicated pair (on the signer host)"
DESCRIPTION = "inspect and change the replicated cluster of the signer running on this host"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the signer's YAML file (finds the socket)")
    where.add_argument("--socket", type=Path, help="the signer's control socket")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    sub = parser.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="role, leader, peers, lag, quorum, snapshot, clocks")
    add = sub.add_parser("add", help="add a new (empty) signer as a voter; then start it")
    add.add_argument("address", help="the new signer's IP:port on the replication link")
    remove = sub.add_parser("remove", help="remove a voter while the cluster has quorum")
    remove.add_argument("address", help="the voter's IP:port")
    force = sub.add_parser(
        "force-standalone",
        help="continue alone after the other signer was fenced (powered off, unplugged)",
    )
    force.add_argument(
        "--fenced",
        action="append",
        required=True,
        metavar="ADDRESS",
        help="each other voter, confirming it is fenced and can never run again as is",
    )
    recover = sub.add_parser(
        "recover",
        help="signer stopped, every signer lost: restart replication from this repository "
        "(restored from a backup) with this signer alone; its next CRL numbers skip past "
        "any that can have been published since the backup",
    )
    recover.add_argument(
        "--crl-number",
        action="append",
        default=[],
        metavar="ISSUER=N",
        help="the highest CRL number of an issuer (by its configured name) known published: "
        "the next is N + 1 instead of the estimate (docs/operations.md, Restore)",
    )


def run(args: argparse.Namespace) -> int:
    if args.cluster_command == "recover":
        return _recover(args)
    path = args.socket or _socket_from_config(args.config)
    request: dict[str, Any] = {"cmd": args.cluster_command.replace("-", "_")}
    if args.cluster_command in ("add", "remove"):
        request["address"] = args.address
    if args.cluster_command == "force-standalone":
        request["fenced"] = args.fenced
    answer = _ask(path, request)
    if not answer.get("ok"):
        error = answer.get("error") or {}
        raise CommandFailed(str(error.get("code")), str(error.get("message")))
    if args.json:
        print_json(answer)
    else:
        show_mapping(answer["result"])
    return EXIT_OK


def _ask(path: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """One request to the control socket; a socket that does not answer is `Unreachable`."""
    from signer.server.control import call

    try:
        return call(path, request, timeout=timeout)
    except (OSError, ValueError) as exc:
        raise Unreachable(f"cannot reach the signer on {path}: {exc}") from None


def _recover(args: argparse.Namespace) -> int:
    """Offline: the signer must not run (its socket must not answer)."""
    from replication.errors import ReplicationError
    from replication.raft import RaftLog
    from signer.config import load
    from signer.server.config import SignerConfig
    from signer.tools.history import issuer_cas
    from storage import Repository, RepositoryError, crl_number_floors, encode

    if args.config is None:
        raise ConfigError("recover needs --config (the signer's YAML file)")
    config = load(args.config, SignerConfig)
    if config.replication is None or config.repository is None:
        raise ConfigError(f"{args.config}: needs the replication and repository sections")
    try:
        _ask(config.replication.socket_path, {"cmd": "status"}, timeout=2)
    except Unreachable:
        pass
    else:
        raise ConfigError("the signer is running: stop it before recovering")
    published = _published_numbers(config, args.crl_number)
    repository = Repository(config.repository.path, config.repository.map_size_gb << 30)
    try:
        floors = crl_number_floors(repository, int(time.time()), published)
        first = [encode(command) for command in floors]
        generation = RaftLog(config.replication, repository).recover_standalone(first)
    except (ReplicationError, RepositoryError) as exc:  # the situation does not allow it: why
        raise CommandFailed("recover_refused", str(exc)) from None
    finally:
        repository.close()
    try:
        names = {issuer.key_id: name for name, issuer in issuer_cas(config).items()}
    except ConfigError:  # a replica without issuers: key ids then
        names = {}
    for command in floors:
        name = names.get(command.issuer, command.issuer.hex())
        print(f"CRLs of {name}: the next is numbered {command.at_least} at least")
    print(f"recovered: this signer alone, generation {generation}; start it, then add the others")
    print("then run `signer webdb-client --reconcile` on the WebDB host (docs/operations.md)")
    return EXIT_OK


def _published_numbers(config: Any, given: list[str]) -> dict[bytes, int]:
    """--crl-number ISSUER=N, by configured issuer name, as key id -> N."""
    from signer.tools.history import issuer_cas

    issuers = issuer_cas(config) if given else {}
    numbers: dict[bytes, int] = {}
    for item in given:
        name, _, number = item.partition("=")
        if name not in issuers or not number.isdigit():
            known = ", ".join(issuers) or "none configured"
            raise ConfigError(f"--crl-number {item!r}: expected ISSUER=N with ISSUER in {known}")
        numbers[issuers[name].key_id] = int(number)
    return numbers


def _socket_from_config(path: Path) -> Path:
    from signer.config import load
    from signer.server.config import SignerConfig

    config = load(path, SignerConfig)
    if config.replication is None:
        raise ConfigError(f"{path}: no replication section: this signer is not in a cluster")
    return config.replication.socket_path
