"""The command line a user types: options, environment defaults, and a server that starts from them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serve.cli import build_parser, settings_from_args


def test_serve_help_lists_the_options() -> None:
    out = subprocess.run([sys.executable, "-m", "serve.cli", "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--host", "--port", "--allow-random-weights", "--cors-allow-origin", "--max-sessions"):
        assert option in out.stdout


def test_host_and_port_come_from_flags_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_args(build_parser().parse_args(["serve"]))
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)  # safe default: local only
    monkeypatch.setenv("WANRT_HOST", "0.0.0.0")
    monkeypatch.setenv("WANRT_PORT", "9001")
    monkeypatch.setenv("PIPELINE", "passthrough")
    settings = settings_from_args(build_parser().parse_args(["serve"]))
    assert (settings.host, settings.port, settings.preload_pipeline) == ("0.0.0.0", 9001, "passthrough")
    args = ["serve", "--port", "9002", "--cors-allow-origin", "https://a.example"]
    settings = settings_from_args(build_parser().parse_args(args))
    assert settings.port == 9002 and settings.cors.extra_origins == ("https://a.example",)


def test_frame_path_options_come_from_flags_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    webrtc = settings_from_args(build_parser().parse_args(["serve"])).webrtc
    assert (webrtc.frame_path, webrtc.x264_preset, webrtc.nvdec) == ("auto", "ultrafast", False)
    monkeypatch.setenv("WANRT_FRAME_PATH", "host")
    monkeypatch.setenv("WANRT_X264_PRESET", "superfast")
    monkeypatch.setenv("WANRT_NVDEC", "1")
    webrtc = settings_from_args(build_parser().parse_args(["serve"])).webrtc
    assert (webrtc.frame_path, webrtc.x264_preset, webrtc.nvdec) == ("host", "superfast", True)
    args = ["serve", "--frame-path", "device", "--x264-preset", "veryfast"]
    webrtc = settings_from_args(build_parser().parse_args(args)).webrtc
    assert (webrtc.frame_path, webrtc.x264_preset) == ("device", "veryfast")
    monkeypatch.setenv("WANRT_FRAME_PATH", "gpu")
    with pytest.raises(ValueError, match="WANRT_FRAME_PATH='gpu': expected one of auto, device, host"):
        build_parser()


def test_every_serve_option_names_its_environment_variable() -> None:
    """The README's promise: each `wanrt serve` option can be set from the environment too (its help says how)."""
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    for action in serve._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and ("env " in action.help or "env=" in action.help), action.option_strings


def test_cors_origins_and_log_level_come_from_flags_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANRT_CORS_ALLOW_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("WANRT_LOG_LEVEL", "warning")
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args).cors.extra_origins == ("https://a.example", "https://b.example")
    assert args.log_level == "warning"
    args = build_parser().parse_args(["serve", "--cors-allow-origin", "https://c.example", "--log-level", "debug"])
    assert settings_from_args(args).cors.extra_origins == ("https://c.example",) and args.log_level == "debug"


def test_codec_preference_comes_from_the_flag_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args(build_parser().parse_args(["serve"])).webrtc.codec_preference == "client"
    monkeypatch.setenv("WANRT_CODEC_PREFERENCE", "h264")
    assert settings_from_args(build_parser().parse_args(["serve"])).webrtc.codec_preference == "h264"
    args = ["serve", "--codec-preference", "client"]
    assert settings_from_args(build_parser().parse_args(args)).webrtc.codec_preference == "client"
    with pytest.raises(SystemExit):  # argparse: a usage error naming the choices
        build_parser().parse_args(["serve", "--codec-preference", "av1"])
    monkeypatch.setenv("WANRT_CODEC_PREFERENCE", "av1")
    with pytest.raises(ValueError, match="WANRT_CODEC_PREFERENCE='av1': expected one of client, h264"):
        build_parser()


def test_server_preloads_the_pipeline_it_is_started_with(tmp_path) -> None:
    import httpx

    from tests.support.server import run_server

    with run_server(tmp_path, "--pipeline", "passthrough") as server:
        status = httpx.get(f"{server.url}/api/v1/pipeline/status").json()
        assert status["status"] in ("loading", "loaded") and status["pipeline_id"] == "passthrough"
