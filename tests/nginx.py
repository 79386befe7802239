"""A real nginx (Debian's package) in front of a real Orthanc, as sites put them: a reverse proxy
that wants an API key, terminates HTTPS with client certificates, or limits request bodies.
And the certificates for it, made with the openssl command."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional

from orthanc import free_port, listens, stop_gently, wait_until_ready

NGINX_BINARY = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """One nginx process with its own prefix folder, proxying a port on 127.0.0.1 to
    `upstream` (an Orthanc's HTTP port), or round robin to several (the nodes of a cluster).
    `server` holds directives added to the server block (for example an `if` that checks a
    header), `http` those of the http block (a map, a limit's zone); `tls`, when given, is
    (certificate, key, client CA or None): HTTPS, with client certificates verified against
    the CA if given."""

    def __init__(self, folder: Path, upstream: "int | list[int]", server: str = "",
                 tls: Optional[tuple[Path, Path, Optional[Path]]] = None,
                 body_limit: str = "0", http: str = "") -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        listen = f"listen 127.0.0.1:{self.port}"
        lines = []
        if tls is not None:
            certificate, key, client_ca = tls
            listen += " ssl"
            lines += [f"ssl_certificate {certificate};", f"ssl_certificate_key {key};"]
            if client_ca is not None:
                lines += [f"ssl_client_certificate {client_ca};", "ssl_verify_client on;"]
        nodes = " ".join(f"server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;"
                         for port in (upstream if isinstance(upstream, list) else [upstream]))
        self.config = f"""
user root;
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    {http}
    upstream orthanc {{ {nodes} keepalive 16; }}
    server {{
        {listen};
        client_max_body_size {body_limit};
        {' '.join(lines)}
        {server}
        location / {{
            proxy_pass http://orthanc;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        path = self.folder / "nginx.conf"
        path.write_text(self.config)
        log = open(self.folder / "stderr.log", "ab")
        self.process = subprocess.Popen([NGINX_BINARY, "-c", str(path), "-p", str(self.folder)],
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until_ready(self.process, lambda: listens(self.port), "nginx", 20,
                         lambda: (self.folder / "stderr.log").read_text(errors="replace"))
        return self

    def stop(self) -> None:
        stop_gently(self.process, signal.SIGQUIT, 10)
        self.process = None


def openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A certificate authority, a server certificate for 127.0.0.1 and a client certificate,
    each signed by it: the PEM files by name (ca, server, server_key, client, client_key),
    and a client certificate signed by another authority (stranger, stranger_key)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.pem" for name in
             ("ca", "ca_key", "server", "server_key", "client", "client_key", "other_ca",
              "other_ca_key", "stranger", "stranger_key")}
    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN=replicate test {ca}", "-keyout", str(files[f"{ca}_key"]),
                "-out", str(files[ca]))
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\n")
    for name, ca, subject in (("server", "ca", "/CN=127.0.0.1"),
                              ("client", "ca", "/CN=replicate client"),
                              ("stranger", "other_ca", "/CN=someone else")):
        request = folder / f"{name}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                "-keyout", str(files[f"{name}_key"]), "-out", str(request))
        openssl("x509", "-req", "-in", str(request), "-CA", str(files[ca]),
                "-CAkey", str(files[f"{ca}_key"]), "-CAcreateserial", "-days", "2",
                "-out", str(files[name]),
                *(("-extfile", str(extensions)) if name == "server" else ()))
    return files
