"""A model that cannot be served as given is refused at load with
ModelLoadError naming the folder or file (missing tokenizer files, broken
weights, badly formed sentence-transformers configs), a tokenizer given as a
path is loaded whatever the model is, and the CLI reports such refusals in
one line with exit status 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from fastserve import Engine, cli, models
from fastserve.errors import ModelLoadError
from fastserve.st_spec import load_spec


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A sentence-transformers folder (mean pooling); tests copy it before changing it."""
    return tm.save("bert", tmp_path_factory.mktemp("loading") / "tiny", pooling="mean")


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _engine(model, **kwargs) -> Engine:
    return Engine(model, device="cpu", replicas=1, warmup=False, torch_threads=1, **kwargs)


# --- a folder without tokenizer files -----------------------------------------


def test_a_folder_without_tokenizer_files_is_refused(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    # transformers builds a tokenizer of the special tokens alone from config.json: every word [UNK].
    with pytest.raises(ModelLoadError, match=re.escape(str(folder)) + ".*tokenizer.json"):
        _engine(str(folder))
    with pytest.raises(ModelLoadError, match="only its special tokens"):  # as an explicit tokenizer too
        _engine(tm.model("bert"), tokenizer=str(folder))


def test_real_tokenizers_still_load(tiny_folder):
    from transformers import AutoTokenizer

    for where in (tiny_folder, models.default_model_path()):
        tok = models._load_tokenizer(AutoTokenizer, str(where))
        assert len(tok) == 30522 and tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


# --- broken weights, tokenizer files, or a file for a folder -------------------


def _writing(name: str, data=None):
    """Overwrite the folder's file `name` with `data` (default: its first 1000 bytes)."""
    def write(folder: Path) -> Path:
        f = folder / name
        f.write_bytes(f.read_bytes()[:1000] if data is None else data)
        return folder
    return write


@pytest.mark.parametrize("break_it", [
    pytest.param(_writing("model.safetensors"), id="weights-truncated"),
    pytest.param(_writing("model.safetensors", b"\0" * 64), id="weights-garbage"),
    pytest.param(_writing("tokenizer.json", b'{"version": "1.0"}'), id="tokenizer-json-keys"),
    pytest.param(lambda folder: folder / "config.json", id="a-file-not-a-folder"),
])
def test_broken_model_files_raise_model_load_error(tiny_folder, tmp_path, break_it):
    where = break_it(_copy(tiny_folder, tmp_path))
    with pytest.raises(ModelLoadError, match=re.escape(repr(str(where)))):
        _engine(str(where))


# --- badly formed sentence-transformers configs --------------------------------


@pytest.mark.parametrize("name, content, match", [
    ("modules.json", [1, 2], "modules.json"),
    ("sentence_bert_config.json", [], "sentence_bert_config.json"),
    ("sentence_bert_config.json", {"max_seq_length": "long"}, "sentence_bert_config.json.*max_seq_length"),
    ("1_Pooling/config.json", [], "1_Pooling/config.json"),
    ("config_sentence_transformers.json", [], "config_sentence_transformers.json"),
])
def test_badly_formed_st_configs_raise_model_load_error_naming_the_file(tiny_folder, tmp_path, name, content, match):
    folder = _copy(tiny_folder, tmp_path)
    (folder / name).write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=match):
        load_spec(folder)


@pytest.mark.parametrize("name, edit", [
    ("modules.json", lambda v: [{**m, "path": 1} if m["path"] == "1_Pooling" else m for m in v]),
    ("1_Pooling/config.json", lambda v: {**v, "pooling_mode": 3}),
    ("config_sentence_transformers.json", lambda v: {**v, "default_prompt_name": ["query"]}),
    ("sentence_bert_config.json", lambda v: {**v, "model_args": ["x"]}),
])
def test_a_value_of_the_wrong_type_in_an_st_config_is_a_model_load_error(tiny_folder, tmp_path, name, edit):
    # Not the AttributeError / TypeError reading it raised.
    folder = _copy(tiny_folder, tmp_path)
    f = folder / name
    f.write_text(json.dumps(edit(json.loads(f.read_text()) if f.exists() else {})))
    with pytest.raises(ModelLoadError, match=re.escape(str(folder))):
        load_spec(folder)
    with pytest.raises(ModelLoadError):
        _engine(str(folder))


def test_dense_weights_that_are_not_weights_are_a_model_load_error(tmp_path):
    import st_models as sm

    folder = sm.save("bert", "mean-dense-normalize", tmp_path / "st")
    weights = next(p for p in (folder / "2_Dense").iterdir() if p.suffix in (".safetensors", ".bin"))
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")  # a pointer
    with pytest.raises(ModelLoadError, match="2_Dense|could not be read"):
        _engine(str(folder))


def test_a_dense_module_that_does_not_take_the_pooled_width_is_refused(tmp_path):
    # Two pooling modes in front of a Dense made for one: every request
    # failed with an InferenceError; now the engine is refused.
    import st_models as sm
    from fastserve.errors import UnsupportedModelError

    folder = sm.save("bert", "mean-dense-normalize", tmp_path / "st")
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    cfg["pooling_mode"] = ["mean", "cls"]  # 64 wide
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="Dense module 0 takes 32 features but is given 64"):
        _engine(str(folder))
    with _engine(str(folder), pooling="cls") as e:  # one mode: 32 wide, as the Dense takes
        assert e.embed("fits").shape == (24,)


@pytest.mark.parametrize("bad", [5, object(), ["tokenizer"]])
def test_a_tokenizer_that_is_none_of_the_kinds_is_a_type_error_naming_it(bad):
    with pytest.raises(TypeError, match="tokenizer must be a path, a hub id or a transformers tokenizer"):
        Engine(tm.model("bert"), bad, warmup=False)


@pytest.mark.parametrize("task, head", [("classify", None), ("rerank", None), ("token-classify", None),
                                        ("token-classify", "sequence"), ("embed", "sequence")])
def test_a_model_object_without_the_head_its_task_runs_is_refused(task, head):
    m = tm.model("bert", classify=head == "sequence", num_labels=2) if head else tm.model("bert")
    with pytest.raises(ModelLoadError, match=f"task={task!r}"):
        Engine(m, tm.tokenizer(), task=task, warmup=False)


def test_a_model_object_from_a_hub_id_keeps_its_sentence_transformers_files(tmp_path, monkeypatch):
    # A model loaded by hub id and passed as an object: its pooling (and a
    # cross-encoder's activation) come from the id's files, as for the id.
    import huggingface_hub
    import st_models as sm
    from test_rerank import cross_encoder_folder

    st = sm.save("bert", "cls-normalize", tmp_path / "st")
    ce, _ = cross_encoder_folder(tmp_path, "bert", activation=__import__("torch").nn.Identity())
    repos = {"someone/st": st, "someone/ce": ce}

    def from_cache(repo_id, filename, **kw):
        f = repos[repo_id] / filename
        if not f.is_file():
            raise FileNotFoundError(filename)
        return str(f)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    from transformers import AutoModel, AutoModelForSequenceClassification

    m = AutoModel.from_pretrained(st)
    m.name_or_path = "someone/st"
    with Engine(m, tm.tokenizer(), warmup=False) as e:
        assert e.pooling == "cls" and e.normalize
    c = AutoModelForSequenceClassification.from_pretrained(ce)
    c.name_or_path = "someone/ce"
    with Engine(c, tm.tokenizer(), task="rerank", warmup=False) as e:
        assert e.activation == "none"  # the folder's Identity, not the one-logit default (sigmoid)


def test_a_pooling_without_its_config_is_refused_naming_the_file(tiny_folder, tmp_path):
    """It was served as mean pooling (sentence-transformers cannot build it)."""
    folder = _copy(tiny_folder, tmp_path)
    (folder / "1_Pooling" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="1_Pooling/config.json is missing"):
        load_spec(folder)


# --- a tokenizer given as a path ------------------------------------------------


@pytest.mark.parametrize("as_path", [str, Path], ids=["str", "pathlike"])
def test_a_model_object_takes_a_tokenizer_path(tiny_folder, as_path):
    m = tm.model("bert")
    expected = tm.reference(m, "hello world")
    with _engine(m, tokenizer=as_path(tiny_folder)) as engine:
        assert engine.tokenizer.is_fast
        np.testing.assert_allclose(engine.embed("hello world"), expected, atol=1e-5, rtol=0)


# --- the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["embed", "--model", "/nonexistent/model", "hi"],
    ["embed", "--model", "{tiny}", "--dtype", "float64", "hi"],
    ["embed", "--model", "{tiny}", "--device", "cuda:99", "hi"],
    ["embed", "--model", "{tiny}", "--max-batch-memory-mb", "0.00001", "hi"],
    ["bench", "--model", "/nonexistent/model", "--requests", "1"],
    ["bench", "--model", "{tiny}", "--dtype", "float64", "--requests", "1"],
    ["serve", "/nonexistent/model", "--port", "0"],
    ["embed", "--model", "{tiny}", "--max-batch-size", "99999999999999999999", "hi"],
    ["embed", "--model", "{tiny}", "--max-batch-memory-mb", "1e308", "hi"],
    ["embed", "--model", "{tiny}", "ab\udcffcd"],  # a byte that is not UTF-8 in argv, as Python decodes it
    ["bench", "--model", "{tiny}", "--max-batch-memory-mb", "0.1", "--requests", "1"],  # a corpus text past it
    ["serve", "{tiny}", "--api-key", ""],  # `--api-key "$KEY"` with KEY unset: was served without a key
    ["serve", "{tiny}", "--model", "/another/model"],  # two models: the positional one was served silently
], ids=["embed-no-model", "embed-dtype", "embed-device", "embed-memory", "bench-no-model", "bench-dtype",
        "serve-no-model", "embed-huge-count", "embed-huge-memory", "embed-not-utf8", "bench-warmup-refused",
        "serve-empty-key", "serve-two-models"])
def test_the_cli_reports_a_refused_engine_in_one_line(tiny_folder, capsys, argv):
    if argv[0] == "serve":
        pytest.importorskip("fastserve.server")
    argv = [str(tiny_folder) if a == "{tiny}" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastserve {argv[0]}: "), err


def test_an_empty_api_key_in_the_environment_is_refused(tiny_folder, capsys, monkeypatch):
    pytest.importorskip("fastserve.server")
    monkeypatch.setenv("FASTSERVE_API_KEY", "")
    assert cli.main(["serve", str(tiny_folder)]) == 2
    assert "the API key (--api-key or $FASTSERVE_API_KEY) is empty" in capsys.readouterr().err


def _stdin(monkeypatch, data: bytes) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="ascii", errors="strict"))


def test_embed_reads_crlf_lines_and_reports_bytes_that_are_not_utf8_in_one_line(tiny_folder, capsys, monkeypatch):
    # stdin decoded strictly (a usual locale): \r\n ends a line, and a byte
    # that is not UTF-8 is the engine's one-line refusal, not a traceback.
    _stdin(monkeypatch, b"hello\r\n\r\n  \r\nworld\r\n")
    assert cli.main(["embed", "--model", str(tiny_folder), "--format", "json"]) == 0
    assert [row["text"] for row in json.loads(capsys.readouterr().out)] == ["hello", "world"]
    _stdin(monkeypatch, b"caf\xe9\n")
    assert cli.main(["embed", "--model", str(tiny_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastserve embed: ") and "not valid Unicode" in err[0], err


def test_bench_reports_a_failed_request_in_one_line(tiny_folder, capsys, monkeypatch):
    # A client thread died with a traceback and the report still looked whole (exit 0).
    from fastserve.errors import InferenceError

    inner = Engine.embed

    def embed(self, texts, *a, **k):
        if isinstance(texts, str) and "e" in texts:  # the clients' single texts; the warm-up is a list
            raise InferenceError("the model raised")
        return inner(self, texts, *a, **k)

    monkeypatch.setattr(Engine, "embed", embed)
    assert cli.main(["bench", "--model", str(tiny_folder), "--requests", "40", "--concurrency", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fastserve bench: a request failed after ")]
    assert len(lines) == 1 and lines[0].endswith("the model raised"), err


@pytest.mark.parametrize("option", ["--requests", "--concurrency"])
def test_bench_needs_at_least_one_request_and_client(capsys, option):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", option, "0"])
    assert exit_.value.code == 2
    assert f"{option}: must be >= 1" in capsys.readouterr().err



@pytest.mark.parametrize("option,value,message", [
    ("--port", "99999", "must be in [0, 65535], got 99999"),  # uvicorn bound 99999 mod 65536
    ("--port", "-1", "must be in [0, 65535], got -1"),
    ("--max-payload-bytes", "0", "must be >= 1"),
    ("--max-inputs-per-request", "0", "must be >= 1"),
    ("--graceful-timeout", "-3", "must be finite seconds >= 0"),
    ("--request-timeout", "0", "must be more than 0 seconds"),
    ("--request-timeout", "nan", "must be finite seconds >= 0"),
])
def test_serve_refuses_bad_server_options_before_loading_anything(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "/nonexistent/model", option, value])
    assert exit_.value.code == 2
    assert f"{option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["serve", "/nonexistent/model", "--num-cpus", "2"], "fastserve serve: --num-cpus: each Ray replica's"),
    (["serve", "/nonexistent/model", "--num-gpus", "1"], "fastserve serve: --num-gpus: each Ray replica's"),
    (["serve", "/nonexistent/model", "--ray", "--max-header-bytes", "100"],
     "fastserve serve: --max-header-bytes is the local server's"),
    (["serve", "/nonexistent/model", "--api-key", "key\n"], "fastserve serve: api_key must be None"),
    (["serve", "/nonexistent/model", "--ray", "--api-key", " key"], "fastserve serve: api_key must be None"),
])
def test_serve_refuses_options_of_the_other_server_instead_of_dropping_them(capsys, argv, message):
    """--replicas/--num-cpus/--num-gpus without --ray were parsed and dropped."""
    pytest.importorskip("fastserve.server")
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_replicas_without_ray_sets_the_engines_replicas(monkeypatch, tiny_folder):
    pytest.importorskip("fastserve.server")

    seen = {}

    def fake_serve(engine, sockets, host, port, **options):
        seen.update(replicas=engine.health()["replicas"], options=options)
        engine.close()

    monkeypatch.setattr(cli, "_serve", fake_serve)
    assert cli.main(["serve", str(tiny_folder), "--port", "0", "--replicas", "1", "--client-timeout", "5",
                     "--max-header-bytes", "4096", "--cors-allow-origin", "https://a.example"]) == 0
    assert seen["replicas"] == 1
    assert seen["options"]["client_timeout_s"] == 5 and seen["options"]["max_header_bytes"] == 4096
    assert seen["options"]["cors_allow_origins"] == ["https://a.example"]


def test_an_unknown_flag_after_a_command_is_reported_by_that_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["embed", "x", "--bogus-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "fastserve embed: error: unrecognized arguments: --bogus-flag" in err and "usage: fastserve embed" in err


def test_embed_into_a_pipe_the_reader_closes_ends_quietly(tiny_folder):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "fastserve.cli", "embed", "--model", str(tiny_folder),
                             "--format", "text", *[f"text {i}" for i in range(2000)]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(proc.stdout.read(10)) == 10  # as `| head -c 10`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def _subprocess_env() -> dict:
    """This interpreter's imports, and no API key from the environment."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FASTSERVE_API_KEY"}
    return {**env, "PYTHONPATH": os.pathsep.join(sys.path)}


def _cli_command(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "fastserve.cli", *args]


def _lines_of(stream):
    """A queue that receives `stream`'s lines (then None at its end), read by a
    daemon thread: a test waits on it with a timeout instead of hanging."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in iter(stream.readline, b""):
            lines.put(line.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for_line(lines, text: str, seen: list[str], timeout: float = 120.0) -> str:
    """The first line of `lines` that holds `text` (all those read kept in `seen`)."""
    import queue
    import time

    end = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(end - time.monotonic(), 0.01))
        except queue.Empty:
            raise AssertionError(f"no line with {text!r} in {timeout} s:\n{''.join(seen)}") from None
        if line is None:
            raise AssertionError(f"the command ended without a line with {text!r}:\n{''.join(seen)}")
        seen.append(line)
        if text in line:
            return line


def test_serve_refuses_a_busy_port_in_one_line_before_loading_the_model(tiny_folder, capsys, monkeypatch):
    """The model loaded (seconds), the banner printed, then uvicorn failed
    "address already in use" and the process exited 3 with its log."""
    import socket

    pytest.importorskip("fastserve.server")
    opened = []
    monkeypatch.setattr(cli, "_open_engine", lambda *a, **k: opened.append(a))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", str(tiny_folder), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastserve serve: cannot listen on 127.0.0.1:{port}: "), err
    assert "another server holds it; stop it, or pick another --port" in err[0], err
    assert opened == []


def test_serve_on_port_0_names_the_port_it_serves_on_and_stops_on_sigterm(tiny_folder):
    """The banner said :0 while uvicorn listened on another port."""
    import signal
    import subprocess
    import urllib.request

    pytest.importorskip("fastserve.server")
    proc = subprocess.Popen(_cli_command("serve", str(tiny_folder), "--port", "0", "--replicas", "1",
                                         "--torch-threads", "1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_subprocess_env())
    try:
        seen: list[str] = []
        lines = _lines_of(proc.stderr)
        banner = _wait_for_line(lines, "fastserve: serving ", seen)
        url = re.search(r"^fastserve: serving .* on (http://127\.0\.0\.1:(\d+))$", banner.strip())
        assert url and int(url[2]) != 0, banner
        # uvicorn's line once it listens (which it leaves out for sockets it is given)
        _wait_for_line(lines, f"Uvicorn running on {url[1]} (Press CTRL+C to quit)", seen)
        with urllib.request.urlopen(url[1] + "/health", timeout=60) as reply:
            assert reply.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_embed_at_a_terminal_says_it_reads_stdin(tiny_folder, capsys, monkeypatch):
    """It waited silently on the terminal for texts nobody knew to type."""
    import io
    import sys

    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b"hello\n"), encoding="utf-8"))
    assert cli.main(["embed", "--model", str(tiny_folder)]) == 0
    out, err = capsys.readouterr()
    end = "Ctrl-Z, Enter" if sys.platform == "win32" else "Ctrl-D"
    assert err.strip().splitlines() == [f"fastserve embed: reading texts from stdin, one per line; end with {end}"]
    assert json.loads(out)["text"] == "hello"
    assert cli.main(["embed", "--model", str(tiny_folder), "given"]) == 0  # texts given: no hint
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv,where", [
    (["embed", "--model", "{tiny}"], "_stdin_lines"),  # waiting on stdin
    (["embed", "--model", "{tiny}", "hi"], "_open_engine"),  # loading the model
    (["bench", "--model", "{tiny}"], "_open_engine"),
    (["serve", "{tiny}", "--port", "0"], "_open_engine"),
    (["embed", "--model", "{tiny}", "hi"], "_quiet_transformers"),  # importing transformers (seconds)
], ids=["embed-stdin", "embed-load", "bench-load", "serve-load", "importing"])
def test_ctrl_c_ends_every_command_with_130_in_one_line(tiny_folder, capsys, monkeypatch, argv, where):
    """A KeyboardInterrupt traceback (bench alone exited 130)."""
    if argv[0] == "serve":
        pytest.importorskip("fastserve.server")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, where, interrupted)
    try:
        code = cli.main([str(tiny_folder) if a == "{tiny}" else a for a in argv])
    except KeyboardInterrupt:  # (not to pytest, which would take it for the user's and stop the run)
        pytest.fail("the KeyboardInterrupt escaped main()")
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines() == [f"fastserve {argv[0]}: interrupted"]


@pytest.mark.skipif(not hasattr(__import__("os"), "openpty"), reason="needs a pseudo-terminal")
def test_ctrl_c_at_the_terminal_prompt_of_embed_exits_130_without_a_traceback(tiny_folder):
    import os
    import signal
    import subprocess

    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen(_cli_command("embed", "--model", str(tiny_folder)), stdin=terminal,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_subprocess_env())
        try:
            seen: list[str] = []
            lines = _lines_of(proc.stderr)
            _wait_for_line(lines, "fastserve embed: reading texts from stdin", seen)
            proc.send_signal(signal.SIGINT)  # as Ctrl-C at the terminal
            assert proc.wait(120) == 130
            _wait_for_line(lines, "fastserve embed: interrupted", seen)
            assert "Traceback" not in "".join(seen), "".join(seen)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(controller)
        os.close(terminal)


def test_embed_refuses_a_model_folder_given_as_a_text(tiny_folder, tmp_path, capsys):
    """`fastserve embed ./my-model "hello"` embedded the path as a text."""
    assert cli.main(["embed", str(tiny_folder), "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastserve embed: {str(tiny_folder)!r} is a model folder; pass it as --model {tiny_folder}"]
    plain = tmp_path / "notes"  # a folder without config.json, and a text that names no folder: embedded
    plain.mkdir()
    assert cli.main(["embed", "--model", str(tiny_folder), str(plain), "config.json"]) == 0
    assert [row["text"] for row in json.loads(capsys.readouterr().out)] == [str(plain), "config.json"]


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastserve {version('fastserve')}"


def test_bench_prints_latency_percentiles_readably_and_json_unchanged(tiny_folder, capsys):
    """latency_ms was printed as a Python dict."""
    argv = ["bench", "--model", str(tiny_folder), "--requests", "20", "--concurrency", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +latency: p50 \d+\.\d\d ms, p95 \d+\.\d\d ms, p99 \d+\.\d\d ms$", out, re.M), out
    assert "{" not in out, out
    assert cli.main([*argv, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["latency_ms"]) == {"p50", "p95", "p99"}


def test_a_missing_extra_names_the_install_from_the_source_folder():
    """The hints named an install from an index; the README installs from the source folder."""
    import subprocess
    import sys

    code = ("import sys\n"
            "sys.modules['ray'] = None\n"
            "try:\n"
            "    import fastserve.ray\n"
            "except ImportError as e:\n"
            "    print(e, file=sys.stderr)\n"
            "sys.modules['uvicorn'] = None\n"
            "from fastserve import cli\n"
            "sys.exit(cli.main(['serve', 'm']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_subprocess_env(),
                          timeout=300)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("fastserve.ray needs") and err[1].startswith("fastserve serve: "), err
    for line, extra in zip(err, ["ray", "serve"]):
        assert f"""pip install ".[{extra}]" in fastserve's source folder""" in line, line
        assert f'pip install "fastserve[{extra}]"' in line, line


def test_the_default_model_goes_by_its_name_and_a_plain_model_by_cosine(tiny_folder):
    from fastserve.models import DEFAULT_MODEL_NAME

    with _engine(None) as engine:
        assert engine.model_name == DEFAULT_MODEL_NAME == "all-MiniLM-L6-v2"
        assert engine.similarity_fn_name == "cosine"  # the model's config names none: cosine, as ST says
    with _engine(str(tiny_folder)) as engine:
        assert engine.model_name == str(tiny_folder) and engine.similarity_fn_name == "cosine"


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_model_name_is_refused_rather_than_read_as_the_current_folder(name):
    with pytest.raises(ModelLoadError, match="empty"):
        Engine(name)


@pytest.mark.parametrize("task", ["classify", "rerank", "token-classify"])
def test_a_plain_encoder_loaded_for_a_task_with_a_head_is_refused(tiny_folder, task):
    """transformers gives the missing head random weights and only logs it:
    served, it answered random scores."""
    with pytest.raises(ModelLoadError, match=r"has no weights for classifier\.bias, classifier\.weight: a model for "
                                             rf"task='{task}' needs its trained head"):
        Engine(str(tiny_folder), task=task, replicas=1, warmup=False)


def test_a_classifier_folder_with_its_head_loads(tmp_path):
    folder = tmp_path / "clf"
    tm.model("bert", classify=True, num_labels=3).save_pretrained(folder)
    tm.tokenizer().save_pretrained(folder)
    with Engine(str(folder), task="classify", replicas=1, warmup=False) as engine:
        assert len(engine.classify(["great"])[0].scores) == 3


def test_an_embedder_without_its_pooler_still_loads(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_folder, tmp_path)
    weights = load_file(folder / "model.safetensors")
    assert any(k.startswith("pooler.") for k in weights)
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with Engine(str(folder), replicas=1, warmup=False) as engine:
        assert engine.embed("x").shape == (32,)


# --- what sentence-transformers 6 reads that was ignored ------------------------


def _st_folder(tiny_folder: Path, tmp_path: Path, *, normalize: bool = False, config: dict | None = None,
               transformer: dict | None = None) -> Path:
    """tiny_folder (Transformer, mean Pooling), with a Normalize module, a
    config_sentence_transformers.json and a sentence_bert_config.json as given."""
    folder = _copy(tiny_folder, tmp_path)
    if normalize:
        modules = json.loads((folder / "modules.json").read_text())
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "modules.json").write_text(json.dumps(modules))
    if config is not None:
        (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    if transformer is not None:
        (folder / "sentence_bert_config.json").write_text(json.dumps(transformer))
    return folder


TEXTS = ["", "x", "Hello, world!", "HELLO World, MIXED Case"] + tm.mixed_texts(6, seed=3)


@pytest.mark.parametrize("key, value", [("query_length", 6), ("document_length", 10),
                                        ("query_expansion", {"strategy": "fixed", "length": 32})])
def test_per_task_lengths_the_engine_cannot_apply_are_refused_not_ignored(tiny_folder, tmp_path, key, value):
    """sentence-transformers 6 cuts encode_query's texts to query_length
    (encode_document's to document_length; query_expansion pads queries):
    the engine has no task to apply them by. It read the folder without a
    word, and embed(prompt_name="query") had a min cosine of 0.89 to
    encode_query with query_length 6."""
    from fastserve.errors import UnsupportedModelError

    base = json.loads((tiny_folder / "sentence_bert_config.json").read_text()) \
        if (tiny_folder / "sentence_bert_config.json").exists() else {}
    folder = _st_folder(tiny_folder, tmp_path, transformer={**base, key: value})
    with pytest.raises(UnsupportedModelError, match=f"Transformer: {key}="):
        _engine(str(folder))
    plain = _st_folder(tiny_folder, tmp_path / "plain", transformer={**base, key: None})  # null: ST's default
    with _engine(str(plain)) as e:
        assert e.embed("fine").shape == (e.dim,)


@pytest.mark.parametrize("normalize", [False, True], ids=["mean", "mean-normalize"])
@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_truncate_dim_of_the_st_config_cuts_every_embedding_after_the_whole_stack(tiny_folder, tmp_path, normalize,
                                                                                  execution):
    """sentence-transformers 6 saves truncate_dim in
    config_sentence_transformers.json and encode() cuts every embedding to it
    after the module stack, without normalising again (a Normalize module's
    unit vectors come out shorter than 1); engine.dim is the cut width. It
    was ignored: 32-wide vectors."""
    full = _st_folder(tiny_folder, tmp_path / "full", normalize=normalize)
    cut = _st_folder(tiny_folder, tmp_path / "cut", normalize=normalize, config={"truncate_dim": 8})
    with _engine(str(full), execution=execution) as e:
        want = e.embed(TEXTS)
        one = e.embed(TEXTS[3])
    assert want.shape == (len(TEXTS), 32)
    with _engine(str(cut), execution=execution) as e:
        assert e.dim == 8
        got = e.embed(TEXTS)
        np.testing.assert_allclose(got, want[:, :8], rtol=0, atol=1e-6)
        np.testing.assert_allclose(e.embed(TEXTS[3]), one[:8], rtol=0, atol=1e-6)
        assert e.embed([]).shape == (0, 8)
        assert e.embed(e.tokenize(TEXTS[:3])).shape == (3, 8)
        if normalize:  # cut after Normalize: not unit length, as encode gives them
            assert e.normalize is False and np.linalg.norm(got[2:], axis=1).max() < 0.999
    with _engine(str(cut), execution=execution, normalize=True) as e:
        # As encode(normalize_embeddings=True): normalised after the cut.
        np.testing.assert_allclose(e.embed(TEXTS[2:]), want[2:, :8] / np.linalg.norm(want[2:, :8], axis=1,
                                                                                       keepdims=True), atol=1e-6)
    with _engine(str(cut), execution=execution, truncate="chunk") as e:
        assert e.dim == 8
        np.testing.assert_allclose(e.embed(TEXTS[3]), one[:8], rtol=0, atol=1e-6)  # one window: as unchunked
        assert e.embed(" ".join(["word"] * 300)).shape == (8,)


def test_a_truncate_dim_past_the_width_cuts_nothing_and_a_bad_one_is_refused(tiny_folder, tmp_path):
    wide = _st_folder(tiny_folder, tmp_path / "wide", config={"truncate_dim": 64})
    with _engine(str(wide)) as e:
        assert e.dim == 32 and e.embed("x").shape == (32,)  # as get_embedding_dimension: min(32, 64)
    none = _st_folder(tiny_folder, tmp_path / "none", config={"truncate_dim": None})
    with _engine(str(none)) as e:
        assert e.dim == 32
    for i, bad in enumerate((0, -4, "8", True, 2.5)):
        folder = _st_folder(tiny_folder, tmp_path / f"bad{i}", config={"truncate_dim": bad})
        with pytest.raises(ModelLoadError, match="truncate_dim"):
            _engine(str(folder))


class _Config:
    def __init__(self, **kw):
        self.model_type, self.pad_token_id = "xlnet", 5
        self.__dict__.update(kw)


class _Model:
    def __init__(self, **kw):
        self.config = _Config(**kw)


class _Tokenizer:
    def __init__(self, model_max_length=int(1e30)):
        self.model_max_length = model_max_length


def test_a_position_table_of_minus_one_is_no_limit():
    """XLNet's max_position_embeddings is -1 ('no limit' to
    sentence-transformers): it was taken as the limit, max_length -1, and
    every max_length refused as 'must be in [1, -1]'."""
    from fastserve.st_spec import ModelSpec

    st = ModelSpec(source="x", sentence_transformers=True, max_seq_length=64)
    assert models.model_max_length(_Model(max_position_embeddings=-1), _Tokenizer(), st) == 64
    assert models.model_max_length(_Model(max_position_embeddings=-1), _Tokenizer(100), ModelSpec(source="x")) == 100
    assert models.model_max_length(_Model(max_position_embeddings=-1), _Tokenizer(), ModelSpec(source="x"),
                                   requested=64) == 64


@pytest.mark.parametrize("transformer, limit", [
    ({"max_seq_length": 16}, 16),
    # sentence-transformers applies max_seq_length only where the tokenizer
    # kwargs set no model_max_length (Transformer.__init__).
    ({"max_seq_length": 16, "tokenizer_args": {"model_max_length": 40}}, 40),
    ({"tokenizer_args": {"model_max_length": 40}}, 40),
    ({"max_seq_length": 16, "processor_kwargs": {"model_max_length": 24}}, 24),
    # processing_kwargs' text max_length is the tokenizer call's: it wins over both.
    ({"max_seq_length": 16, "tokenizer_args": {"model_max_length": 40},
      "processing_kwargs": {"text": {"max_length": 6}}}, 6),
    ({"tokenizer_args": {"model_max_length": 40}, "processing_kwargs": {"text": {"max_length": 100}}}, 100),
    # Past the position table (128): the table's limit.
    ({"max_seq_length": 16, "tokenizer_args": {"model_max_length": 1000}}, 128),
    ({}, 128),
])
def test_the_length_limit_follows_sentence_transformers_precedence(tiny_folder, tmp_path, transformer, limit):
    folder = _st_folder(tiny_folder, tmp_path, transformer=transformer)
    with _engine(str(folder)) as e:
        assert e.max_length == limit
        long = " ".join(["word"] * 200)
        assert len(e.tokenize([long])[0]) == limit


def test_a_bad_tokenizer_model_max_length_is_refused_naming_it(tiny_folder, tmp_path):
    folder = _st_folder(tiny_folder, tmp_path, transformer={"tokenizer_args": {"model_max_length": "long"}})
    with pytest.raises(ModelLoadError, match="model_max_length"):
        load_spec(folder)


def test_every_embedding_model_has_the_empty_query_and_document_prompts(tiny_folder, tmp_path):
    """sentence-transformers 6 gives every model {"query": "", "document": ""}
    under its saved prompts (encode_query passes prompt_name="query"): fastserve
    refused prompt_name="query", and a folder whose default_prompt_name is
    "query" without a saved query prompt."""
    plain = tmp_path / "plain"
    tm.save("bert", plain)  # no modules.json
    texts = TEXTS[2:6]
    for model in (str(tiny_folder), str(plain), tm.model("bert")):
        with _engine(model, **({"tokenizer": tm.tokenizer()} if not isinstance(model, str) else {})) as e:
            assert e.prompts == {"query": "", "document": ""} and e.default_prompt_name is None
            want = e.embed(texts)
            for name in ("query", "document"):
                np.testing.assert_array_equal(e.embed(texts, prompt_name=name), want)
    saved = _st_folder(tiny_folder, tmp_path / "saved", config={
        "prompts": {"passage": "p: ", "query": "q: ", "none": None}, "default_prompt_name": "query"})
    with _engine(str(saved)) as e:
        # In sentence-transformers' order: the defaults' keys first, the saved values in them.
        assert list(e.prompts.items()) == [("query", "q: "), ("document", ""), ("passage", "p: "), ("none", "")]
        np.testing.assert_array_equal(e.embed(texts), e.embed(texts, prompt="q: "))
    default_query = _st_folder(tiny_folder, tmp_path / "default-query",
                               config={"prompts": {}, "default_prompt_name": "query"})
    with _engine(str(default_query)) as e:
        assert e.default_prompt_name == "query" and e.prompts["query"] == ""
        np.testing.assert_array_equal(e.embed(texts), e.embed(texts, prompt=""))
    unknown = _st_folder(tiny_folder, tmp_path / "unknown", config={"default_prompt_name": "passage"})
    with pytest.raises(ModelLoadError, match="default_prompt_name 'passage'"):
        load_spec(unknown)


def _no_limit_t5(tmp_path: Path) -> Path:
    """A T5 encoder (relative positions: no position table) whose tokenizer
    sets no model_max_length."""
    import st_models as sm

    folder = sm.save_encoder("t5", tmp_path / "t5")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("model_max_length", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_a_model_without_any_length_limit_warns_of_the_assumed_512_and_takes_any_max_length(tmp_path):
    """No position table, no tokenizer limit, no max_seq_length: a silent
    512-token cut (sentence-transformers cuts nothing), and max_length above
    512 was refused."""
    import warnings

    folder = _no_limit_t5(tmp_path)
    long = " ".join(["word"] * 700)
    with pytest.warns(RuntimeWarning, match=r"no length limit.*512 tokens.*max_length="):
        e = _engine(str(folder))
    with e:
        assert e.max_length == 512 and len(e.tokenize([long])[0]) == 512
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with _engine(str(folder), max_length=1024) as e:
            assert e.max_length == 1024
            assert len(e.tokenize([long])[0]) == 702
            f = e.submit(long)
            assert f.result(timeout=60).shape == (32,) and f.info.truncated is False
