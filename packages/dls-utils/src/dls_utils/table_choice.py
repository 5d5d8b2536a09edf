"""Which lock table dls-dump and dls-ipcrm work on: ``--key``, else the environment's instance.

Both name a table by its instance or by its bare IPC key, and then need to
know whether the instance's pid files (in $JBCRELEASEDIR/run) are that
table's: for a table of another instance there are none to read, and what the
tools say of its monitor and listener must come from its header instead.
"""

from __future__ import annotations

import argparse

from dls_shm import DEFAULT_RELEASE_DIR, Instance, parse_ipc_key

#: How the tools' epilogs say which table they work on.
TABLE_HELP = f"table: --key KEY, else $DLS_IPC_KEY, else the key of $JBCRELEASEDIR (default {DEFAULT_RELEASE_DIR})."


def add_key_option(parser: argparse.ArgumentParser) -> None:
    """``--key``: name a table by its IPC key instead of by the instance (dls-dump, dls-ipcrm)."""
    parser.add_argument("--key", metavar="KEY", type=ipc_key,
                        help="the table's SysV IPC key (0xNNNNNNNN or decimal) instead of the one of "
                        "$DLS_IPC_KEY or $JBCRELEASEDIR")


def ipc_key(text: str) -> int:
    """An argparse type: a SysV IPC key of a table, 0x hex or decimal (as DLS_IPC_KEY takes it)."""
    try:
        return parse_ipc_key(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid key: {exc}") from None


def chosen_table(args: argparse.Namespace) -> tuple[Instance, bool]:
    """The instance whose table the tool works on, and whether its pid files are that table's.

    Raises ValueError (dls_proto's ConfigurationError) for a bad $JBCRELEASEDIR or $DLS_IPC_KEY.
    """
    instance = Instance.from_environment()
    own_pid_files = args.key is None or args.key == instance.key
    if args.key is not None:
        instance = Instance(instance.root, args.key)
    return instance, own_pid_files
