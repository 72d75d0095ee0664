"""nginx with the RTMP module (Debian `nginx-light` + `libnginx-mod-rtmp`) on loopback."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from infra.process import ManagedProcess, free_port, http_ok, tcp_port_open
from realtime.errors import LipsyncError

RTMP_MODULE_PATH = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
RTMP_APPLICATION = "live"


class NginxMissingError(LipsyncError, RuntimeError):
    """nginx with the RTMP module is not installed."""

    code = "nginx_missing"


def nginx_binary() -> Path:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None or not RTMP_MODULE_PATH.exists():
        raise NginxMissingError(
            "nginx with the RTMP module is not installed: apt-get install nginx-light libnginx-mod-rtmp"
        )
    return Path(found)


@dataclass(frozen=True)
class RtmpServerConfig:
    host: str = "127.0.0.1"
    rtmp_port: int = 0
    http_port: int = 0  # serves /stat (rtmp_stat) for health checks

    def with_free_ports(self) -> RtmpServerConfig:
        return RtmpServerConfig(
            host=self.host,
            rtmp_port=self.rtmp_port or free_port(self.host),
            http_port=self.http_port or free_port(self.host),
        )

    def publish_url(self, stream: str) -> str:
        return f"rtmp://{self.host}:{self.rtmp_port}/{RTMP_APPLICATION}/{stream}"

    @property
    def stat_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/stat"

    def nginx_conf(self, prefix: Path) -> str:
        return f"""
load_module {RTMP_MODULE_PATH};
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
rtmp {{
    server {{
        listen {self.host}:{self.rtmp_port};
        chunk_size 4096;
        application {RTMP_APPLICATION} {{
            live on;
            record off;
            # Players may wait for a publisher that has not started yet.
            idle_streams on;
            allow publish 127.0.0.1;
            deny publish all;
            allow play 127.0.0.1;
            deny play all;
        }}
    }}
}}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {self.host}:{self.http_port};
        location /stat {{ rtmp_stat all; }}
    }}
}}
"""


def server_process(config: RtmpServerConfig, workdir: Path) -> ManagedProcess:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(config.nginx_conf(workdir))
    return ManagedProcess(
        name="nginx-rtmp",
        argv=[str(nginx_binary()), "-p", str(workdir), "-c", str(conf_path)],
        log_path=workdir / "nginx.log",
        health=lambda: tcp_port_open(config.host, config.rtmp_port) and http_ok(config.stat_url),
        startup_timeout_s=15.0,
    )
