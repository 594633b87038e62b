"""Profiles: merging, and one clear line for every kind of bad file."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tightwad_core.config.profiles import ConfigError, find_config, load_profile, parse_listen

GOOD_TARGET = '[profiles.p.target]\nbackend = "llama-server"\nurl = "http://127.0.0.1:8080"\n'

BAD = [
    # (name, file text, fragments that must all be in the one-line error)
    ("not toml", "[profiles.p\n", ["not valid TOML"]),
    ("unknown key", '[profiles.p]\nlisen = "x"\n' + GOOD_TARGET, ["profile 'p'", "unknown field `lisen`"]),
    ("unknown backend key", GOOD_TARGET + "modle = 3\n", ["profile 'p'", "target", "unknown field `modle`"]),
    ("wrong type", '[profiles.p]\nmax_tokens_limit = "lots"\n' + GOOD_TARGET,
     ["profile 'p'", "field 'max_tokens_limit'", "Expected `int`"]),
    ("wrong nested type", GOOD_TARGET + "parallel = 1.5\n", ["field 'target.parallel'", "Expected `int`"]),
    ("bad url", '[profiles.p.target]\nbackend = "llama-server"\nurl = "localhost:8080"\n',
     ["field 'target.url'", "http(s) URL"]),
    ("bad port", '[profiles.p.target]\nbackend = "llama-server"\nurl = "http://h:99999"\n',
     ["field 'target.url'", "port"]),
    ("no target", "[profiles.p]\n", ["field 'target'", "[target]"]),
    ("neither url nor model", '[profiles.p.target]\nbackend = "llama-server"\n', ["field 'target'", "url"]),
    ("both url and model", GOOD_TARGET + 'model_path = "x.gguf"\n', ["not both"]),
    ("missing model file", '[profiles.p.target]\nbackend = "llama-server"\nmodel_path = "nope.gguf"\n',
     ["field 'target.model_path'", "does not exist"]),
    ("unknown builtin", '[profiles.p.target]\nbackend = "llama-server"\nmodel_path = "@gpt-5"\n',
     ["field 'target.model_path'", "unknown built-in model"]),
    ("extends missing", '[profiles.p]\nextends = "base"\n' + GOOD_TARGET, ["field 'extends'", "'base'"]),
    ("extends loop", '[profiles.p]\nextends = "q"\n[profiles.q]\nextends = "p"\n', ["loop", "p -> q -> p"]),
    ("off loopback no key", '[profiles.p]\nlisten = "0.0.0.0:8088"\n' + GOOD_TARGET,
     ["field 'api_key'", "beyond loopback"]),
    ("bad listen", '[profiles.p]\nlisten = "8088"\n' + GOOD_TARGET, ["field 'listen'", "host:port"]),
    ("zero limit", '[profiles.p]\nmax_tokens_limit = 0\n' + GOOD_TARGET, ["field 'max_tokens_limit'"]),
    ("top-level typo", 'defualt_profile = "p"\n' + GOOD_TARGET, ["unknown field `defualt_profile`"]),
]


@pytest.mark.parametrize("name,text,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_config_one_line(tmp_path: Path, name: str, text: str, fragments: list[str]) -> None:
    path = tmp_path / "tightwad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profile(path, "p")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    for frag in fragments:
        assert frag in msg, msg


def test_unknown_profile_lists_known(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(GOOD_TARGET)
    with pytest.raises(ConfigError, match=r"no profile named 'x' \(profiles: p\)"):
        load_profile(path, "x")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_profile(tmp_path / "absent.toml", "p")


def test_extends_merges_tables(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        'default_profile = "child"\n'
        '[profiles.base]\nmax_tokens_limit = 100\ndescription = "base"\n'
        '[profiles.base.target]\nbackend = "llama-server"\nurl = "http://127.0.0.1:1"\nparallel = 3\n'
        '[profiles.child]\nextends = "base"\ndescription = "child"\n'
        '[profiles.child.target]\nurl = "http://127.0.0.1:2"\n')
    name, prof = load_profile(path)
    assert name == "child"
    assert prof.description == "child" and prof.max_tokens_limit == 100
    assert prof.target.url == "http://127.0.0.1:2" and prof.target.parallel == 3
    assert prof.target.backend == "llama-server"


def test_relative_model_path_is_from_config_dir(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = tmp_path / "t.toml"
    path.write_text('[profiles.p.target]\nbackend = "llama-server"\nmodel_path = "m.gguf"\n')
    _, prof = load_profile(path, "p")
    assert prof.target.model_path == "m.gguf"


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TIGHTWAD_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert find_config() == tmp_path / "xdg" / "tightwad" / "tightwad.toml"
    (tmp_path / "tightwad.toml").write_text("")
    assert find_config() == Path("tightwad.toml")
    monkeypatch.setenv("TIGHTWAD_CONFIG", "/etc/x.toml")
    assert find_config() == Path("/etc/x.toml")
    assert find_config("/a/b.toml") == Path("/a/b.toml")


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:8088", ("127.0.0.1", 8088)), ("[::1]:9", ("::1", 9)), ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "tightwad"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_init_check_show_roundtrip(tmp_path: Path) -> None:
    r = _cli("init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tightwad.toml").exists()
    assert _cli("init", cwd=tmp_path).returncode == 2  # refuses to overwrite
    r = _cli("config", "check", "--no-files", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 profile(s) valid" in r.stdout
    r = _cli("config", "show", "--profile", "remote", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = tomllib.loads(r.stdout)
    assert shown["target"]["url"] == "http://192.0.2.10:8080"
    assert shown["max_tokens_limit"] == 4096  # defaults filled in


def test_config_check_json_error(tmp_path: Path) -> None:
    (tmp_path / "tightwad.toml").write_text('[profiles.p]\nmode = 3\n')
    r = _cli("config", "check", "--json", cwd=tmp_path)
    assert r.returncode == 2
    assert '"ok": false' in r.stdout and "field 'mode'" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("table, field, typo", [
    ('[profiles.p]\nmode = "speculatve"\n', "mode", "speculatve"),
    ('[profiles.p.speculation]\nverifier = "prefix-btach"\n', "speculation.verifier", "prefix-btach"),
    ('[profiles.p.draft]\nbackend = "llama-sever"\nurl = "http://127.0.0.1:8081"\n', "draft.backend",
     "llama-sever"),
])
def test_config_check_names_plugins(tmp_path: Path, table: str, field: str, typo: str) -> None:
    """A typo in a plugin name is caught by `config check`, with the names that exist."""
    (tmp_path / "tightwad.toml").write_text(table + GOOD_TARGET)
    r = _cli("config", "check", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0, line
    assert f"field '{field}'" in line and repr(typo) in line and "profile 'p'" in line, line
    known = {"mode": "direct", "speculation.verifier": "prefix-batch", "draft.backend": "llama-server"}
    assert known[field] in line, line


def test_a_users_profile_extends_a_shipped_one(tmp_path: Path) -> None:
    """The shipped file says to start from one of its profiles: a user's file
    can, its own fields win, and `config show` says where each came from."""
    import json

    path = tmp_path / "tightwad.toml"
    path.write_text('[profiles.mine]\nextends = "speculative"\nlisten = "127.0.0.1:9099"\n'
                    '[profiles.mine.speculation]\nmax_draft_tokens = 4\n'
                    # a user profile of a shipped name wins, and may extend the shipped one
                    '[profiles.demo]\nextends = "demo"\ndescription = "my demo"\n')
    name, prof = load_profile(path, "mine", check_files=False)
    assert prof.mode == "speculative" and prof.listen == "127.0.0.1:9099"
    assert prof.speculation.max_draft_tokens == 4
    assert prof.target is not None and prof.target.backend == "worker"  # from the shipped one
    _, demo = load_profile(path, "demo", check_files=False)
    assert demo.description == "my demo" and demo.target is not None
    path.write_text('[profiles.mine]\nextends = "nowhere"\n')
    with pytest.raises(ConfigError, match="nowhere.*shipped"):
        load_profile(path, "mine", check_files=False)
    path.write_text('[profiles.mine]\nextends = "speculative"\nlisten = "127.0.0.1:9099"\n')
    r = _cli("config", "show", "--profile", "mine", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["listen"] == "127.0.0.1:9099"
    assert "# where each field was set" in r.stdout
    r = _cli("config", "show", "--profile", "mine", "--json", cwd=tmp_path)
    shown = json.loads(r.stdout)
    assert shown["sources"]["listen"] == "tightwad.toml [profiles.mine]"
    assert "(shipped)" in shown["sources"]["target.backend"]
    assert "max_body_bytes" not in shown["sources"]  # a default, set nowhere


@pytest.mark.parametrize("cluster, says", [
    ('experts = "balanced"\nplacement = "balanced"\n', "places experts, not layers"),
    ('experts = "memory-proportional"\n', "no expert placement strategy named 'memory-proportional'"),
    ('experts = "bogus"\n', "no expert placement strategy named 'bogus'"),
    ('experts = "profile-guided"\n', "needs a routing profile"),
    ('experts = "profile-guided"\nrouting_profile = "missing.json"\n', "missing.json is not a file"),
    ('experts = "balanced"\nexpert_cpu = "lots"\n', "cluster.expert_cpu"),
])
def test_config_check_catches_what_the_pool_would_refuse(tmp_path: Path, cluster: str,
                                                         says: str) -> None:
    """An expert placement the pool would refuse at `tightwad start` is caught by
    `config check` already, in one line."""
    (tmp_path / "tightwad.toml").write_text(
        '[profiles.p]\n[profiles.p.target]\nbackend = "llama-server"\nmodel_path = "m.gguf"\n'
        '[profiles.p.cluster]\n' + cluster +
        '[[profiles.p.cluster.workers]]\nname = "a"\nhost = "127.0.0.1"\nport = 50052\n')
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # the model's file is there; only the names are wrong
    r = _cli("config", "check", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    line = r.stderr.strip()
    assert line.count("\n") == 0 and says in line and "profiles.p" in line, line


@pytest.mark.parametrize("mode, wanted", [("gate", "needs [[drafters]] tables"),
                                          ("consensus", "needs a [draft] table or [[drafters]]"),
                                          ("speculative", "needs a [draft] table or [[drafters]]")])
def test_config_check_names_the_backend_tables_a_mode_needs(tmp_path: Path, mode: str,
                                                            wanted: str) -> None:
    """A mode whose drafters (or draft) are missing is refused by `config check`
    with the table to add, as `tightwad run` would refuse it."""
    (tmp_path / "tightwad.toml").write_text(f'[profiles.p]\nmode = "{mode}"\n' + GOOD_TARGET)
    r = _cli("config", "check", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and wanted in line and f"mode {mode!r}" in line, line
    fleet = '[[profiles.p.drafters]]\nbackend = "llama-sever"\nurl = "http://127.0.0.1:8081"\n'
    (tmp_path / "tightwad.toml").write_text(f'[profiles.p]\nmode = "{mode}"\n' + GOOD_TARGET + fleet)
    r = _cli("config", "check", cwd=tmp_path)
    assert r.returncode == 2 and "field 'drafters[0].backend'" in r.stderr, r.stderr
    (tmp_path / "tightwad.toml").write_text(
        f'[profiles.p]\nmode = "{mode}"\n' + GOOD_TARGET + fleet.replace("sever", "server"))
    r = _cli("config", "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
