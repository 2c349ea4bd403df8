"""What the server and the client share about asyncio streams: chunk size and closing.

Never waits without a bound.
"""

from __future__ import annotations

import asyncio

#: Bytes asked of a stream per read; also the StreamReader's flow-control limit, so that at
#: most about twice this is buffered before the transport stops reading.
READ_CHUNK = 64 * 1024


async def close_stream(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    """Close gracefully (TLS close_notify included) if the peer lets us within `timeout`,
    else drop the connection."""
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()
