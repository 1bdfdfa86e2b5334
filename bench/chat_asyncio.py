"""A minimal asyncio broadcast chat server: the baseline of bench/chat.py.

    python bench/chat_asyncio.py PORT [HOST]

Line framing: every line a client sends goes, prefixed ``<host:port> ``, to every connected
client, the sender included (the same wire format as netsvc chat's room messages). One
``writer.write`` per client and no per-client ``drain``: a client that does not read cannot stall
the room (its output just piles up in its transport).
"""

import asyncio
import sys

clients: set[asyncio.StreamWriter] = set()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host, port = writer.get_extra_info("peername")[:2]
    prefix = f"<{host}:{port}> ".encode()
    clients.add(writer)
    try:
        while line := await reader.readline():
            if not line.endswith(b"\n"):
                break  # EOF in the middle of a line
            message = prefix + line
            for client in clients:
                client.write(message)
    except (ConnectionError, ValueError):  # reset; line over the StreamReader limit
        pass
    finally:
        clients.discard(writer)
        writer.close()


async def main() -> None:
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    server = await asyncio.start_server(handle, host, port, backlog=100)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
