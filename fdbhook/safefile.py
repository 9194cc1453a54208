"""Every file root writes goes through here: no symlink, no planted file, no predictable name.

fdbhook runs as root (libvirtd's hooks, fdbhookd); an unprivileged user may
own or share directories on the way to what it writes, and this must hold
whatever ``fs.protected_symlinks``/``fs.protected_regular`` say. So:

* a directory is reached component by component from ``/`` with
  ``O_DIRECTORY|O_NOFOLLOW`` (a symlink anywhere on the path is refused);
  every ancestor must be owned by root (or by us) and, if others may write
  it, sticky (``/tmp``); the directory itself, and every one we create, must
  be root's and writable by nobody else (``trusted=False`` drops the owner
  and mode checks, keeping the no-symlink walk: node_exporter's textfile
  directory, which we only ever rename into, and a log's directory, where
  the file itself is checked);
* a file is created relative to that directory's fd with
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` under an unpredictable ``.tmp-<pid>-<hex>`` name,
  with its mode set at creation, fsynced, renamed over the final name
  (``rename`` replaces a planted link, never follows it), and the
  directory fsynced;
* an append-only file (a log) is opened with ``O_NOFOLLOW`` and used only
  if it is a regular file of ours with one link; otherwise it is created
  with ``O_EXCL``.

Failures raise :class:`UnsafePath` (an ``OSError``: callers that already
handle I/O errors handle these) with a one-line reason.
"""

import errno
import os
import secrets
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path fdbhook refuses to write through; ``str()`` is the one-line reason."""

    def __init__(self, path, reason):
        super().__init__(errno.EPERM, reason, path)
        self.path = path
        self.reason = reason

    def __str__(self):
        return "%s: %s" % (self.path, self.reason)


def _owners():
    return {0, os.geteuid()}


def _check(path, st, last, trusted):
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(path, "not a directory")
    if not trusted:
        return  # only renamed into (or a file of ours checked on its own): no symlink on the way is enough
    mode = stat.S_IMODE(st.st_mode)
    if last:
        if st.st_uid not in _owners():
            raise UnsafePath(path, "owned by uid %d, not root: refused" % st.st_uid)
        if mode & 0o022:
            raise UnsafePath(path, "writable by group or others (mode %04o): refused" % mode)
        return
    if st.st_uid not in _owners():
        raise UnsafePath(path, "owned by uid %d, not root: refused" % st.st_uid)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UnsafePath(path, "writable by group or others and not sticky (mode %04o): refused" % mode)


def open_dir(path, create=False, mode=0o700, trusted=True):
    """A verified fd of directory ``path`` (absolute); missing components are created (``mode``) if ``create``.

    The caller closes the fd. Raises UnsafePath or OSError.
    """
    if not path or not os.path.isabs(path):
        raise UnsafePath(path or "''", "not an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(path, "'..' in the path")
    fd = os.open("/", DIR_FLAGS)
    here = ""
    try:
        for i, name in enumerate(parts):
            here += "/" + name
            last = i == len(parts) - 1
            try:
                new = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                    new = os.open(name, DIR_FLAGS, dir_fd=fd)
                    os.fchmod(new, mode)  # the umask may have taken bits off; never adds any
                except FileExistsError:
                    new = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(here, "a symlink or not a directory: refused") from None
                raise
            os.close(fd)
            fd = new
            _check(here, os.fstat(fd), last, trusted)
        if not parts:
            _check("/", os.fstat(fd), True, trusted)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(path, mode=0o700):
    """Create (or verify) a root-only directory; UnsafePath if it is a link or somebody else's."""
    os.close(open_dir(path, create=True, mode=mode))


def tmp_name():
    """``.tmp-<pid>-<hex>``: a sweep of leftovers (fdbhook.state) spares the files of writers still alive."""
    return ".tmp-%d-%s" % (os.getpid(), secrets.token_hex(8))


def write_at(dir_fd, name, data, mode=0o600, fsync=True, group=None):
    """Replace ``name`` in the directory ``dir_fd`` with ``data``, atomically (temp file, rename)."""
    if "/" in name or name in ("", ".", ".."):
        raise UnsafePath(name, "not a plain file name")
    tmp = tmp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # the umask took bits off the creation mode
            if group is not None:
                os.fchown(fd, -1, group)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if fsync:
        try:
            os.fsync(dir_fd)
        except OSError:
            pass


def write_file(path, data, mode=0o600, dir_mode=0o700, create=True, trusted=True, fsync=True, group=None):
    """``write_at`` by path: the directory verified (and created with ``dir_mode`` if ``create``) first."""
    directory, name = os.path.split(path)
    dir_fd = open_dir(directory, create=create, mode=dir_mode, trusted=trusted)
    try:
        write_at(dir_fd, name, data, mode=mode, fsync=fsync, group=group)
    finally:
        os.close(dir_fd)


def touch_at(dir_fd, name, mode=0o600):
    """Create ``name`` if missing (no symlink followed); an existing regular file is left as it is."""
    fd = open_at(dir_fd, name, os.O_RDWR | os.O_CREAT, mode)
    os.close(fd)


def open_at(dir_fd, name, flags, mode=0o600):
    """``os.open`` relative to a verified directory, never through a symlink; a regular file only."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(name, "not a regular file: refused")
    return fd


def open_append(path, mode=0o640, group=None):
    """An fd appending to ``path``: our own regular file with one link, or a new one made with O_EXCL.

    The directory is walked without following links (its owner may be
    another user, e.g. group syslog on /var/log: we only trust the file
    itself, which must be root's, a regular file and not hard-linked).
    """
    directory, name = os.path.split(path)
    dir_fd = open_dir(directory or ".", trusted=False) if directory else os.open(".", DIR_FLAGS)
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd)
            os.fchmod(fd, mode)
            if group is not None:
                try:
                    os.fchown(fd, -1, group)
                except OSError:
                    pass
            return fd
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(path, "a symlink: refused") from None
            raise
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif st.st_nlink != 1:
            problem = "has %d hard links" % st.st_nlink
        elif st.st_uid != os.geteuid():
            problem = "owned by uid %d" % st.st_uid
        if problem:
            os.close(fd)
            raise UnsafePath(path, problem + ": refused")
        if stat.S_IMODE(st.st_mode) & ~mode:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & mode)  # never more open than asked (0644 -> 0640)
        return fd
    finally:
        os.close(dir_fd)


def listing(dir_fd):
    """[(name, lstat)] of the regular files in a verified directory (links and others left out)."""
    out = []
    for name in os.listdir(dir_fd):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.append((name, st))
    return out
