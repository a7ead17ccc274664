"""One frozen dataclass per kind of tier, each field with its Setting, and the kind registry.

What a tier's YAML may say, the ``LMTIER_<TIER>__<FIELD>`` overrides and the docs table all
come from these fields: a new field is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from lmtier.admission import ADMISSION_POLICIES
from lmtier.config.fields import (
    choice,
    flag,
    optional,
    seconds,
    setting,
    shown_fields,
    text,
    whole,
)
from lmtier.config.tier_checks import (
    GB,
    SIZE_KEYS,
    auth_key,
    device,
    existing_file,
    file_mode,
    folder,
    redis_url,
    size_bytes,
)
from lmtier.errors import ConfigError
from lmtier.evictor.registry import evictor_names
from lmtier.secret import Secret, redact_url

__all__ = [
    "DiskTierSpec",
    "MemoryTierSpec",
    "RedisTierSpec",
    "TierSpec",
    "register_tier_kind",
    "spec_class",
    "tier_kinds",
]

S = TypeVar("S", bound="type[TierSpec]")

_KINDS: dict[str, type[TierSpec]] = {}  # in the order registered: the docs table's order


def register_tier_kind(spec: S) -> S:
    """Make ``spec.KIND`` a ``kind`` that tier configs may name (a class decorator)."""
    if spec.KIND in _KINDS:
        raise ConfigError(f"a tier kind named {spec.KIND!r} is already registered")
    _KINDS[spec.KIND] = spec
    return spec


def tier_kinds() -> list[str]:
    """The kinds in the order registered."""
    return list(_KINDS)


def spec_class(kind: str) -> type[TierSpec]:
    try:
        return _KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(_KINDS))
        raise ConfigError(f"unknown tier kind {kind!r}; known: {known}") from None


_kind_name = choice(lambda: sorted(_KINDS))


@dataclass(frozen=True, repr=False)
class TierSpec:
    """What every tier has; each kind's spec adds its own fields (keyword-only).

    Calling ``TierSpec(name, kind, max_size_bytes, **fields)`` builds the spec of ``kind``, so
    code that spells a tier with its kind as data need not name the class.
    """

    KIND: ClassVar[str] = ""

    name: str = setting("unique name, used in stats and env overrides", text(), verbatim=True)
    kind: str = setting("", _kind_name, verbatim=True)  # the docs list the registered kinds
    max_size_bytes: int = setting(
        "the tier's byte budget (exactly one; 1 GB = 1024³ bytes)",
        size_bytes,
        keys=SIZE_KEYS,
    )
    evictor: str = setting(
        "policy by name: `lru`, `fifo`, `lfu`, `s3fifo`, `arc`, `prefix` (see [Eviction "
        "policies](evictors.md#eviction-policies)); on the last tier of a config the vLLM and "
        "SGLang integrations load, `prefix` when none is named. The shipped configs name "
        "theirs: `lru` on memory tiers and `prefix` on the last tier "
        "([why](policies.md#the-default-evictor))",
        choice(evictor_names),
        "lru",
        verbatim=True,
    )
    admission: str = setting(
        "`all` or `second_hit`: a chunk offered to the tier (a put, demotion or promotion) is "
        "written only if it was offered before or hit in any tier within the window; a refused "
        "put goes on to the next tier, a refused demotion to the next tier or is dropped "
        "(counted in `drops`); refusals count in `admission_rejects`",
        choice(lambda: ADMISSION_POLICIES),
        "all",
        verbatim=True,
    )
    admission_window: int | None = setting(
        "`second_hit`'s memory in entries (key hashes, oldest forgotten first); none: 4 times the "
        "tier's capacity in entries of the size being offered",
        optional(whole),
        None,
    )
    required: bool = setting(
        "a tier this machine cannot hold (a `cuda` tier without CUDA) is skipped with a log "
        "line unless `true`",
        flag,
        False,
    )

    if TYPE_CHECKING:
        # What type checkers see of the dispatch in __new__; each kind's class has its own.
        def __init__(
            self, name: str, kind: str, max_size_bytes: int, *args: Any, **fields: Any
        ) -> None: ...

    def __new__(cls, *args: Any, **kwargs: Any) -> TierSpec:
        if cls is TierSpec:
            kind = kwargs["kind"] if "kind" in kwargs else args[1] if len(args) > 1 else None
            if kind is None:
                raise TypeError("TierSpec() needs a kind, the second argument")
            cls = spec_class(kind)
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if self.kind != self.KIND:
            raise ConfigError(f"tier {self.name!r}: a {type(self).__name__} has kind {self.KIND!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({shown_fields(self)})"

    @property
    def max_size_gb(self) -> float:
        return self.max_size_bytes / GB

    def check_together(self, where: str) -> None:
        """Raise ConfigError for fields that are valid alone but not together."""


# ------------------------------------------------------------------------------- memory
@register_tier_kind
@dataclass(frozen=True, repr=False, kw_only=True)
class MemoryTierSpec(TierSpec):
    """GPU or CPU memory."""

    KIND: ClassVar[str] = "memory"

    device: str = setting("`cpu`, `cuda` or `cuda:N`", device, "cpu", verbatim=True)
    pinned: bool = setting(
        "cpu tiers: page-locked memory when CUDA is present (plain memory otherwise)", flag, True
    )


# --------------------------------------------------------------------------------- disk
_AUTH_KEY_HELP = (
    "a secret that keys every entry's checksum (at most one of the two): a file only its owner "
    "may read (`chmod 600`; one final line ending is not part of the secret), or an environment "
    "variable that is set and not empty. Never printed"
)
_AUTH_KEYS = ("auth_key_file", "auth_key_env")


@register_tier_kind
@dataclass(frozen=True, repr=False, kw_only=True)
class DiskTierSpec(TierSpec):
    """A folder of entry files."""

    KIND: ClassVar[str] = "disk"

    path: str = setting("the folder (created if missing; must be writable)", folder, verbatim=True)
    durability: str = setting(
        "`none` or `fsync` (fsync each file before its rename and its folder after)",
        choice(lambda: ("fsync", "none")),
        "none",
        verbatim=True,
    )
    mode: int = setting(
        "octal mode of entry files and LOCK (`0o640` or `'0640'`; folders get an execute bit "
        "for each read bit): user and group bits only, the user's read and write included",
        file_mode,
        0o600,
        show=oct,
    )
    auth_key: Secret | None = setting(
        _AUTH_KEY_HELP, auth_key, None, keys=_AUTH_KEYS, verbatim=True, secret=True, show=repr
    )

    @property
    def folder_mode(self) -> int:
        """``mode`` with a search (execute) bit for each read bit."""
        return self.mode | (self.mode & 0o440) >> 2


# -------------------------------------------------------------------------------- redis
@register_tier_kind
@dataclass(frozen=True, repr=False, kw_only=True)
class RedisTierSpec(TierSpec):
    """A Redis or Valkey server (or cluster) that instances share."""

    KIND: ClassVar[str] = "redis"

    url: str = setting(
        "`redis://[user:password@]host[:port][/db]`, or `rediss://...` for TLS (a password "
        "in it is never printed)",
        redis_url,
        verbatim=True,
        show=lambda url: repr(redact_url(url)),
    )
    username: str | None = setting(
        "the user to log in as (overrides the URL's)", optional(text()), None, verbatim=True
    )
    password: str | None = setting(
        "the user's password (overrides the URL's; never printed): prefer "
        "`LMTIER_<TIER>__PASSWORD` to writing it in a file",
        optional(text()),
        None,
        verbatim=True,
        secret=True,
    )
    key_prefix: str | None = setting(
        "prefix of every key name; none: `lmtier:<hash of the namespace>`",
        optional(text(nonempty=True, hint=" (omit it for a default)")),
        None,
        verbatim=True,
    )
    connect_timeout_s: float = setting("longest wait to connect, in seconds", seconds, 2.0)
    op_timeout_s: float = setting("longest wait for one round trip, in seconds", seconds, 2.0)
    reconnect_max_s: float = setting(
        "longest wait between reconnection probes while the server is down", seconds, 10.0
    )
    cluster: bool = setting("`true` for a Redis Cluster (`url` names any node)", flag, False)
    tls_ca_file: str | None = setting(
        "`rediss://` only: CA bundle that signed the server's certificate; none: the system's",
        optional(existing_file),
        None,
        verbatim=True,
    )
    tls_cert_file: str | None = setting(
        "`rediss://` only: this client's certificate, for servers that ask for one (with "
        "`tls_key_file`)",
        optional(existing_file),
        None,
        verbatim=True,
    )
    tls_key_file: str | None = setting(
        "`rediss://` only: the key of `tls_cert_file`", optional(existing_file), None, verbatim=True
    )
    auth_key: Secret | None = setting(
        _AUTH_KEY_HELP, auth_key, None, keys=_AUTH_KEYS, verbatim=True, secret=True, show=repr
    )

    def check_together(self, where: str) -> None:
        files = {"tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file}
        files["tls_key_file"] = self.tls_key_file
        given = [key for key, path in files.items() if path is not None]
        if given and urlsplit(self.url).scheme != "rediss":
            raise ConfigError(f"{where}: field {given[0]!r} needs a rediss:// url (TLS)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(f"{where}: fields 'tls_cert_file' and 'tls_key_file' go together")
