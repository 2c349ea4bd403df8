"""PostgreSQL frontend/backend protocol 3.0, sans-IO: bytes in, message objects out, and back.

Never touches a socket, a clock, or asyncio."""
