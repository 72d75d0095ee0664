"""The service configs keep everything on loopback (a config regression would be a network leak)."""

from __future__ import annotations

from pathlib import Path

import yaml

from infra.livekit import LiveKitServerConfig
from infra.rtmp import RtmpServerConfig
from infra.temporal import TemporalDevServerConfig, dev_server_argv
from workflows.search_attributes import ALL_KEYS


def test_livekit_config_is_loopback_only() -> None:
    config = LiveKitServerConfig().with_free_ports()
    document = yaml.safe_load(config.to_yaml())
    assert document["bind_addresses"] == ["127.0.0.1"]
    rtc = document["rtc"]
    assert rtc["use_external_ip"] is False
    assert rtc["node_ip"] == "127.0.0.1"
    assert rtc["ips"]["includes"] == ["127.0.0.1/32"]
    assert rtc["stun_servers"] == [f"127.0.0.1:{config.stun_port}"]
    assert rtc["turn_servers"] == []
    assert document["turn"]["enabled"] is False
    # Subscribers get the avatar's tracks under one stream id, so that they lip-sync them
    # (tests/infra/test_livekit_stream_sync.py shows what that does).
    assert document["room"]["sync_streams"] is True


def test_nginx_conf_listens_on_loopback(tmp_path: Path) -> None:
    config = RtmpServerConfig().with_free_ports()
    conf = config.nginx_conf(tmp_path)
    assert f"listen 127.0.0.1:{config.rtmp_port};" in conf
    assert f"listen 127.0.0.1:{config.http_port};" in conf
    assert "deny publish all;" in conf


def test_temporal_dev_server_registers_search_attributes_and_binds_loopback() -> None:
    argv = dev_server_argv(TemporalDevServerConfig().with_free_ports())
    for key in ALL_KEYS:
        assert f"{key.name}=Keyword" in argv
    assert argv[argv.index("--ip") + 1] == "127.0.0.1"
    assert argv[argv.index("--ui-ip") + 1] == "127.0.0.1"
    assert "--ui-disable-news-fetch" in argv
