"""The ACME state on disk (``acme.state_dir``), and who may change it.

Layout (directories 0700, files 0600, whatever the umask)::

    state_dir/
      lock                 flock()ed by the one process that talks to the CA
      selfsigned.pem       the temporary certificate, key first
      <ca>/                one per directory URL (staging and production
                           accounts and certificates never mix)
        account.key        the account key
        certificate.pem    the certificate served: key, then the full chain
        challenges/        open challenges, only while an order needs them
          http-01/TOKEN        the key authorization (RFC 8555 section 8.3)
          tls-alpn-01/NAME.pem key and certificate (RFC 8737 section 3)

Every file is written whole to a temporary name and renamed into place, so a
reader (another worker, a restart after a crash) sees the old file or the
new one, never a part. The processes that only serve read these files; the
one holding ``lock`` writes them. This module does no network IO.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from urllib.parse import urlsplit

#: An ACME token is base64url (RFC 8555 section 8.1): it names a file here,
#: so nothing else may pass.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}\Z")
_NAME = re.compile(r"[a-z0-9.-]{1,253}\Z")


def ca_dir_name(directory: str) -> str:
    """A directory name for a CA's directory URL: host, port and path, e.g.
    ``acme-v02.api.letsencrypt.org-directory``."""
    url = urlsplit(directory)
    raw = f"{url.netloc}{url.path}".lower()
    return re.sub(r"[^a-z0-9.]+", "-", raw).strip("-.") or "ca"


class Store:
    """Paths and file operations of one ``state_dir`` and directory URL."""

    def __init__(self, state_dir: str, directory: str) -> None:
        self.root = state_dir
        self.ca = os.path.join(state_dir, ca_dir_name(directory))
        self.account_key = os.path.join(self.ca, "account.key")
        self.certificate = os.path.join(self.ca, "certificate.pem")
        self.self_signed = os.path.join(state_dir, "selfsigned.pem")
        self.challenges = os.path.join(self.ca, "challenges")
        self._lock_fd: int | None = None

    # -- directories and files

    def prepare(self) -> None:
        """Create the directories (0700). Raises OSError."""
        _mkdir(self.root, parents=True)
        _mkdir(self.ca)

    def read(self, path: str) -> bytes | None:
        """The content of *path*, or None when it does not exist."""
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def mtime(self, path: str) -> float | None:
        """When *path* was last written (for the certificate: when it was obtained)."""
        try:
            return os.stat(path).st_mtime
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes) -> None:
        """Replace *path* with *data*, atomically, mode 0600."""
        directory = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write *path* (0600) only if it does not exist yet; False if it did.
        For keys: two processes never end up with different ones."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    # -- challenges

    def http01_path(self, token: str) -> str | None:
        if not TOKEN.match(token):
            return None
        return os.path.join(self.challenges, "http-01", token)

    def alpn_path(self, name: str) -> str | None:
        name = name.lower().rstrip(".")
        if not _NAME.match(name) or ".." in name:
            return None
        return os.path.join(self.challenges, "tls-alpn-01", name + ".pem")

    def put_http01(self, token: str, key_authorization: str) -> None:
        path = self.http01_path(token)
        if path is None:
            raise ValueError(f"the CA sent a token that is not base64url: {token!r}")
        _mkdir(os.path.dirname(path), parents=True)
        self.write(path, key_authorization.encode("ascii"))

    def put_alpn(self, name: str, pem: bytes) -> None:
        path = self.alpn_path(name)
        if path is None:
            raise ValueError(f"not a DNS name: {name!r}")
        _mkdir(os.path.dirname(path), parents=True)
        self.write(path, pem)

    def clear_challenges(self) -> None:
        """Remove every open challenge: no order needs them any more."""
        shutil.rmtree(self.challenges, ignore_errors=True)

    # -- the process that talks to the CA

    def try_lock(self) -> bool:
        """Become the one process of this state_dir that talks to the CA;
        False if another holds it. Kept until :meth:`unlock` or exit (the
        kernel drops an flock with its process, so a crashed holder frees it)."""
        if self._lock_fd is not None:
            return True
        fd = os.open(os.path.join(self.root, "lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None


def _mkdir(path: str, *, parents: bool = False) -> None:
    """Create *path* 0700 (not loosened by the umask); an existing one is kept
    as it is."""
    if parents:
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            _mkdir(parent, parents=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is not a directory") from None
        return
    os.chmod(path, 0o700)
