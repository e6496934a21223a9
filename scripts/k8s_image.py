"""Builds a container image from local binaries, as an OCI image layout tarball.

Usage: k8s_image.py OUT.tar NAME [--user UID:GID] [--cmd ARG]... BINARY=PATH_IN_IMAGE...

The image has one layer: each binary at its path, every shared library `ldd` lists for it at
the path the dynamic loader looks for it, /etc/passwd and /etc/group naming root and the
distroless "nonroot" user (65532), and an empty /tmp. Its entrypoint is the first binary, its
command the --cmd arguments. NAME is the image's full reference (docker.io/library/chatoy:local);
`ctr images import` reads it from the index's io.containerd.image.name annotation.

This stands in for `docker build` on machines without a container engine or a registry (the
Kubernetes test cluster of scripts/k8s-e2e); deploy/Dockerfile stays the production recipe.
The tarball is reproducible: fixed timestamps and owners, files in sorted order.
"""
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnonroot:x:65532:\n"


def libraries(binary):
    """The shared libraries `ldd` resolves for `binary`: (path in the image, file on this
    machine). A static binary has none."""
    result = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if result.returncode != 0:
        if "not a dynamic executable" in result.stdout + result.stderr:
            return []
        raise SystemExit(f"ldd {binary} failed: {result.stderr.strip()}")
    found = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise SystemExit(f"{binary}: a library is missing: {line}")
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            found.append((match.group(1), Path(match.group(1)).resolve()))
    return found


def layer(files):
    """An uncompressed tar of `files` (path in the image -> bytes or a file), with every parent
    directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = {"tmp"}
        for path in files:
            parts = path.strip("/").split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for name in sorted(dirs):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755, 0
            tar.addfile(info)
        for path in sorted(files):
            content = files[path]
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            info = tarfile.TarInfo(path.strip("/"))
            executable = not isinstance(content, bytes)
            info.size, info.mode, info.mtime = len(data), 0o755 if executable else 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def blob(out, data, media_type):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    out[f"blobs/sha256/{digest[7:]}"] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def main():
    args = sys.argv[1:]
    if len(args) < 3:
        raise SystemExit(__doc__)
    output, name, rest = args[0], args[1], args[2:]
    user, cmd, binaries = "0:0", [], []
    while rest:
        arg = rest.pop(0)
        if arg == "--user":
            user = rest.pop(0)
        elif arg == "--cmd":
            cmd.append(rest.pop(0))
        elif "=" in arg:
            source, target = arg.split("=", 1)
            binaries.append((source, target))
        else:
            raise SystemExit(f"unexpected argument {arg!r}\n{__doc__}")
    if not binaries:
        raise SystemExit("no binary given")
    files = {"/etc/passwd": PASSWD.encode(), "/etc/group": GROUP.encode()}
    for source, target in binaries:
        if not Path(source).is_file():
            raise SystemExit(f"no binary at {source}")
        files[target] = source
        for in_image, on_host in libraries(source):
            files.setdefault(in_image, str(on_host))
    tar = layer(files)
    blobs = {}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": user,
            "Entrypoint": [binaries[0][1]],
            "Cmd": cmd,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(blobs, json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(blobs, tar, "application/vnd.oci.image.layer.v1.tar")],
    }
    descriptor = blob(blobs, json.dumps(manifest, sort_keys=True).encode(), manifest["mediaType"])
    descriptor["platform"] = {"architecture": "amd64", "os": "linux"}
    descriptor["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [descriptor]}
    entries = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), "index.json": json.dumps(index).encode(), **blobs}
    with tarfile.open(output, "w") as out:
        for path in sorted(entries):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(entries[path]), 0, 0o644
            out.addfile(info, io.BytesIO(entries[path]))
    print(f"{name}: {len(files)} files, {len(tar) // 1024} KiB ({descriptor['digest']})")


main()
