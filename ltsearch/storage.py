"""Where an experiment lives: a local folder or an object-storage URI (`s3://bucket/prefix`, `gs://...`,
`abfs://...`: any URI pyarrow's file systems take), read and written through pyarrow, the layer Ray Tune
itself stores checkpoints and its state through. The S3 endpoint and credentials come from the usual
environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ..., or the node's role), as for Ray.

A local folder keeps its atomic writes (temporary file, then rename); an object store's put is atomic
by itself. pyarrow is imported on first use (the analysis layer imports this module and must start fast).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

__all__ = ["Location", "StorageError", "is_uri", "local_mirror"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(ValueError):
    """A storage location that cannot be used; the message is one line naming it and what failed."""


def is_uri(text: str | Path) -> bool:
    """Whether `text` is a URI of a remote file system (`file://` is local)."""
    return bool(_SCHEME.match(str(text))) and not str(text).startswith("file://")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")


def _s3_credentials_visible() -> bool:
    """Whether this process has S3 credentials other than a node role: keys, a profile, a web identity or
    container credentials in the environment, or a shared credentials file."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    shared = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser()
    return any(os.environ.get(n) for n in names) or shared.is_file()


def _why(err: OSError, scheme: str) -> str:
    """What a store's error means for the user: no credentials, access refused (credentials, permissions)
    or no answer."""
    text = _first_line(err)
    if scheme == "s3" and not _s3_credentials_visible():
        return ("no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or give "
                f"the node a role) and the store refused the request ({text})")
    if any(word in text for word in _DENIED):
        return ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile "
                f"or the node's role) and the bucket's permissions ({text})")
    return f"the store does not answer ({text})"


class Location:
    """A folder or file, local or remote. `str()` gives what Ray's `storage_path` and the user see: the
    absolute local path, or the URI."""

    def __init__(self, text: str | Path | Location, _fs=None, _path: str | None = None):
        if isinstance(text, Location):  # as given: callers may pass either
            self.fs, self.path, self.uri = text.fs, text.path, text.uri
            return
        text = str(text)
        if _fs is not None:
            self.fs, self.path = _fs, _path
            self.uri = f"{self.scheme}://{_path}"
            return
        if not is_uri(text):
            self.fs, self.uri = None, str(Path(text.removeprefix("file://")).expanduser().resolve())
            self.path = self.uri
            return
        import pyarrow.fs

        try:
            self.fs, path = pyarrow.fs.FileSystem.from_uri(text)
        except ValueError as err:  # an unknown scheme, a malformed URI
            raise StorageError(f"{text}: not a storage URI pyarrow can open ({_first_line(err)})") from None
        except OSError as err:  # S3 asks the store for the bucket's region
            raise StorageError(f"{text}: {_why(err, text.split(':', 1)[0])}") from None
        self.path = path.rstrip("/")
        self.uri = f"{self.scheme}://{self.path}"

    @property
    def scheme(self) -> str:
        if self.fs is None:
            return "file"
        name = self.fs.type_name
        return {"gcs": "gs"}.get(name, name)

    @property
    def is_local(self) -> bool:
        return self.fs is None

    @property
    def local_path(self) -> Path:
        if self.fs is not None:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> Location:
        if self.fs is None:
            return Location(Path(self.path) / name)
        return Location(self.uri, _fs=self.fs, _path=f"{self.path}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local location is path-like (`open`, pandas, ...); a remote one is not."""
        if self.fs is not None:
            raise TypeError(f"{self.uri} is in object storage, not a local path")
        return self.path

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        if self.fs is None:
            return Path(self.path).exists()
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def is_file(self) -> bool:
        if self.fs is None:
            return Path(self.path).is_file()
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def size(self) -> int:
        return Path(self.path).stat().st_size if self.fs is None else self._info().size

    def children(self) -> list[str]:
        """Names of the entries directly in this folder (none when it does not exist)."""
        if self.fs is None:
            return sorted(p.name for p in Path(self.path).iterdir()) if Path(self.path).is_dir() else []
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def read_bytes(self) -> bytes:
        if self.fs is None:
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        if self.fs is None:
            path = Path(self.path)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        if self.fs is None:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.path)

    def delete(self) -> None:
        """Remove this file or folder (nothing when it does not exist)."""
        if self.fs is None:
            path = Path(self.path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            return
        import pyarrow.fs

        kind = self._info().type
        if kind == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pyarrow.fs.FileType.File:
            self.fs.delete_file(self.path)

    def download(self, dest: Path) -> Path:
        """Copy this file or folder to the local `dest` (replacing a file there); return `dest`."""
        import pyarrow.fs

        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.fs is None:
            if Path(self.path).is_dir():
                shutil.copytree(self.path, dest, dirs_exist_ok=True)
            else:
                shutil.copyfile(self.path, dest)
            return dest
        if self._info().type == pyarrow.fs.FileType.Directory:
            dest.mkdir(exist_ok=True)  # pyarrow copies a folder's files into an existing folder
        pyarrow.fs.copy_files(self.path, str(dest), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return dest

    def upload(self, source: Path) -> None:
        """Copy the local file or folder `source` to this location."""
        import pyarrow.fs

        if self.fs is None:
            if source.is_dir():
                shutil.copytree(source, self.path, dirs_exist_ok=True)
            else:
                self.write_bytes(source.read_bytes())
            return
        pyarrow.fs.copy_files(str(source), self.path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def check_creatable(self) -> None:
        """Refuse, in one line, a location this process cannot create files in: a local folder whose nearest
        existing ancestor is not a writable folder; a URI whose store does not answer, whose bucket does not
        exist, or where a probe object cannot be written (credentials, permissions). Leaves no file (an
        object store may keep an empty folder marker: an experiment there exists when it holds files)."""
        if self.fs is None:
            ancestor = Path(self.path).parent
            while not ancestor.exists():
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise StorageError(f"cannot create {self.uri}: {ancestor} is not a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise StorageError(f"cannot create {self.uri}: {ancestor} is not writable")
            return
        import pyarrow.fs

        bucket = self.path.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
        except OSError as err:
            raise StorageError(f"{self.uri}: {_why(err, self.scheme)}") from None
        if not found:
            raise StorageError(f"{self.uri}: bucket {bucket!r} does not exist (create it first)")
        probe = self / f".ltsearch-probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
            probe.delete()
        except OSError as err:
            raise StorageError(f"{self.uri}: cannot write there: {_why(err, self.scheme)}") from None


def local_mirror(location: Location, kind: str) -> Path:
    """A folder on this machine for local copies of a remote `location`'s files (`kind`: "studies",
    "experiments", ...), the same for the same URI on every machine and user (under the temp dir)."""
    import hashlib

    digest = hashlib.sha1(location.uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ltsearch-{kind}" / f"{location.name}-{digest}"
