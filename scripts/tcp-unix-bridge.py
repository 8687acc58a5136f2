#!/usr/bin/env python3
"""A TCP-to-unix-socket bridge for tools that speak HTTP only over TCP (scripts/fuzz-api).

Usage: tcp-unix-bridge.py UNIX_SOCKET PORT_FILE

Listens on 127.0.0.1 on a free port, writes that port to PORT_FILE once listening, and relays
each TCP connection to a new connection on UNIX_SOCKET, byte for byte, both ways (a half-close
on one side is passed on to the other). Python standard library only.
"""

import asyncio
import os
import signal
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def relay(socket_path: str, tcp_reader, tcp_writer) -> None:
    try:
        unix_reader, unix_writer = await asyncio.open_unix_connection(socket_path)
    except OSError as e:
        print(f"tcp-unix-bridge: cannot connect to {socket_path}: {e}", file=sys.stderr)
        tcp_writer.close()
        return
    await asyncio.gather(pipe(tcp_reader, unix_writer), pipe(unix_reader, tcp_writer))
    for w in (unix_writer, tcp_writer):
        w.close()


async def main(socket_path: str, port_file: str) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(socket_path, r, w), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    tmp = f"{port_file}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.rename(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: tcp-unix-bridge.py UNIX_SOCKET PORT_FILE")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
