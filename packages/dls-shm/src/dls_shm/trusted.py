"""Trusted paths: the checks live in ``dls_proto.trusted`` (see there), where a client without dls-shm finds
them too (its binary lock directory, its TRACE file); this name keeps every user of dls-shm's as it was."""

from dls_proto.trusted import (
    ANY_OWNER,
    FILE,
    GROUP_FILE,
    NOFOLLOW,
    PRIVATE,
    SHARED,
    Untrusted,
    check,
    check_ancestors,
    check_fd,
    group_id,
    group_name,
    make_dir,
    make_parent,
    open_file,
    owner_name,
    problem_of,
    trusted_owners,
    write_new,
)

__all__ = [
    "ANY_OWNER", "FILE", "GROUP_FILE", "NOFOLLOW", "PRIVATE", "SHARED", "Untrusted", "check", "check_ancestors",
    "check_fd", "group_id", "group_name", "make_dir", "make_parent", "open_file", "owner_name", "problem_of",
    "trusted_owners", "write_new",
]
