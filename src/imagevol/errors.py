"""One exception hierarchy for the whole library.

Every error carries a message that names what was wrong and, where one exists, a hint that says
what would help. The CLI maps the classes to exit codes in one place (:func:`exit_code_for`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_MATCH = 3
EXIT_REFUSED = 4


class ImagevolError(Exception):
    """Base class of every error imagevol raises on purpose."""

    exit_code: int = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(ImagevolError):
    """The caller asked for something malformed (a bad flag value, reference or platform)."""

    exit_code = EXIT_USAGE


class InvalidReferenceError(UsageError):
    """A reference string does not follow the distribution/reference grammar."""


class InvalidPlatformError(UsageError):
    """A platform string is not `os/arch[/variant]` or names an unknown part."""


class InvalidDigestError(UsageError):
    """A digest string is not `algorithm:hex` with a supported algorithm and length."""


class NotFoundError(ImagevolError):
    """A reference, manifest or blob does not exist in the source or the store."""


class RegistryError(ImagevolError):
    """The registry answered with an error (its OCI error body is in the message)."""

    def __init__(self, message: str, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


class AuthError(RegistryError):
    """Authentication or authorization failed (401/403)."""


class TransportError(ImagevolError):
    """The network failed: connection refused or reset, timeout, TLS failure."""


class NoMatchError(ImagevolError):
    """No manifest in an index matches the node's platform under the chosen policy."""

    exit_code = EXIT_NO_MATCH

    def __init__(self, message: str, hint: str | None = None, trace: object | None = None) -> None:
        super().__init__(message, hint)
        self.trace = trace


class ContentRefusedError(ImagevolError):
    """Content was refused: verification failed, a format is refused, or content is unsafe."""

    exit_code = EXIT_REFUSED


class DigestMismatchError(ContentRefusedError):
    """Bytes do not hash to the digest that names them."""


class SizeMismatchError(DigestMismatchError):
    """A source serves a blob (or manifest) of another size than its descriptor states: the
    descriptor's size is authoritative, so this is a verification failure, not a transport fault."""

    @classmethod
    def of(cls, what: str, where: str, stated: int, served: int | str) -> SizeMismatchError:
        """`what` (``blob DIGEST``) from `where` is `served` bytes (or e.g. "more than N"), not `stated`."""
        return cls(
            f"{what} from {where}: size mismatch: the descriptor states {stated} bytes, the source serves {served}",
            hint="the source serves different content than the manifest describes; nothing was stored",
        )


class ManifestError(ContentRefusedError):
    """A manifest or index is malformed, ambiguous, oversized or of a refused type (schema1)."""


class UnsafeContentError(ContentRefusedError):
    """A layer or artifact tries to write outside its root, or holds content refused by policy."""


class LimitExceededError(ContentRefusedError):
    """Content exceeds a configured limit (a layer's decompressed size or ratio): not corrupt,
    refused by policy; raising the limit admits it."""


class EgressRefusedError(ContentRefusedError):
    """A registry, token service or redirect target that the egress policy does not admit (a registry
    outside the --allow-registry list, or a loopback, link-local or node address): nothing was sent."""


class StoreError(ImagevolError):
    """The content store is unusable or inconsistent."""


class IngestBusyError(StoreError):
    """Another process holds the ingest of a blob (``Store.ingest(blocking=False)``)."""


class BusyError(ImagevolError):
    """A volume cannot be removed while processes use it (the unmount was refused with EBUSY)."""


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, ImagevolError):
        return exc.exit_code
    return EXIT_ERROR
