"""fdbhook(8) and the bash completion come from the same parser as --help, and work."""

import os
import shutil
import subprocess

import pytest

from fdbhook.cli import build_parser, main
from fdbhook.manpage import _subcommands, render_completion, render_manpage


def test_manpage_names_every_subcommand_and_option_of_the_parser():
    parser = build_parser()
    page = render_manpage(parser, version="9.9", date="2026-12-01")
    assert page.startswith('.TH FDBHOOK 8 "2026-12-01" "fdbhook 9.9"')
    for name, sub, text in _subcommands(parser):
        assert ".SS %s\n" % name in page
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt.replace("-", "\\-") in page, (name, opt)
    for word in ("FDBHOOK_DOMAIN", "MESSAGE_ID", "fdbhook_hook_duration_seconds", "EXIT STATUS", "FDBHOOK_CONF"):
        assert word.replace("-", "\\-") in page


@pytest.mark.skipif(not shutil.which("man"), reason="man-db not installed")
def test_manpage_renders_without_warnings(tmp_path):
    path = tmp_path / "fdbhook.8"
    path.write_text(render_manpage(build_parser()))
    out = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True, text=True,
                         env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin", "MANWIDTH": "100"})
    assert out.returncode == 0 and "fdbhook status" in out.stdout.replace("\u2010", "-"), out
    assert out.stderr == "", out.stderr


def test_cli_prints_both(capsys):
    assert main(["manpage"]) == 0
    assert capsys.readouterr().out.startswith(".TH FDBHOOK 8")
    assert main(["completion"]) == 0
    assert "complete -F _fdbhook fdbhook" in capsys.readouterr().out


def _complete(tmp_path, words):
    """Run the completion function on ``words`` (the last one being completed); COMPREPLY as a list."""
    script = tmp_path / "fdbhook.bash"
    script.write_text(render_completion(build_parser()))
    virsh = tmp_path / "bin" / "virsh"
    virsh.parent.mkdir(exist_ok=True)
    virsh.write_text("#!/bin/sh\n[ \"$*\" = '-q list --all --name' ] && printf 'web1\\nweb2\\ndb 1\\n'\n")
    virsh.chmod(0o755)
    code = ('source %s; COMP_WORDS=(%s); COMP_CWORD=%d; _fdbhook; printf "%%s\\n" "${COMPREPLY[@]}"'
            % (script, " ".join("'%s'" % w for w in words), len(words) - 1))
    out = subprocess.run(["bash", "--norc", "-c", code], capture_output=True, text=True,
                         env={"PATH": "%s:/usr/bin:/bin" % virsh.parent})
    assert out.returncode == 0, out
    return [line for line in out.stdout.splitlines() if line]


def test_completion_subcommands_options_and_domain_names(tmp_path):
    assert "status" in _complete(tmp_path, ["fdbhook", "st"]) and "manpage" in _complete(tmp_path, ["fdbhook", ""])
    assert _complete(tmp_path, ["fdbhook", "apply", "we"]) == ["web1", "web2"]
    assert _complete(tmp_path, ["fdbhook", "-c", "/x.conf", "teardown", "d"]) == ["db 1"]
    assert "--dry-run" in _complete(tmp_path, ["fdbhook", "apply", "--d"])
    assert _complete(tmp_path, ["fdbhook", "hook", "l"]) == ["lxc"]
    assert _complete(tmp_path, ["fdbhook", "status", "--j"]) == ["--json"]


def test_completion_script_is_valid_bash(tmp_path):
    path = tmp_path / "c.bash"
    path.write_text(render_completion(build_parser()))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert os.path.getsize(path) < 8192
