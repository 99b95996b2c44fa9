"""Which sockets a set of processes listens on (Linux /proc, no extra package): the fleet and S3 tests check
that the local services they start (Ray, moto) listen on loopback only, and that they are gone at the end."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def session_pids(sessions: set[int]) -> set[int]:
    """Every live process whose session id is one of ``sessions`` (what a ``start_new_session`` child and all
    it started, unless they left the session, make up)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) in sessions and fields[0] != "Z":  # field 6 of stat: the session id
            out.add(int(d.name))
    return out


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # each 32-bit word is in host order
    return str(ipaddress.IPv6Address(words))


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state and every bound UDP socket the processes hold."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = []
    for table, listen_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == listen_state and inode in owner:
                addr, port = local.split(":")
                found.append((owner[inode], _address(addr), int(port, 16)))
    return found


def not_loopback(found: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    """The entries of ``listening`` reachable from outside this machine (any address but 127/8, ::1, and
    IPv4-mapped loopback)."""
    def loop(a: str) -> bool:
        ip = ipaddress.ip_address(a)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)
    return [f for f in found if not loop(f[1])]
