"""Fetching `image_uris` for a stranger without letting it reach this server's own network (SSRF).

Every hop resolves the host name here, checks every DNS answer, and connects to the checked address itself
(the URL given to httpx holds the IP; Host and TLS SNI carry the name), so a DNS answer that changes between
the check and the connection cannot reach a forbidden address. Redirects are followed here, re-checked hop by
hop. Bodies are bounded in bytes (compressed and decompressed), the whole fetch in time. data: URIs are decoded
with a size limit.

Look-ups run on c-ares (aiodns) rather than getaddrinfo in the default thread pool, which image decoding and PNG
encoding share: at most MAX_LOOKUPS at once, each within --dns-timeout-s, and a cancelled request drops its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
import zlib
from collections.abc import Awaitable, Callable, Sequence

import aiodns
import httpx

from server.errors import RequestError
from server.settings import Settings

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_LOOKUPS = 64  # DNS look-ups in flight; more wait for a free one (within their time budget)
_REDIRECTS = (301, 302, 303, 307, 308)
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+)((?:;[^,;]*)*?);base64,(.*)", re.DOTALL | re.IGNORECASE)
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")  # 2130706433, 127.1, 0x7f.1: what inet_aton (and browsers) accept
_ENCODINGS = ("gzip", "x-gzip", "deflate")  # decoded within the byte limit; the fetcher asks for nothing else


class DnsResolver:
    """Resolves image_uris hosts with c-ares (aiodns): its own sockets and thread, bounded, cancellable."""

    def __init__(self, nameservers: Sequence[str] = (), timeout_s: float = 5.0):
        self.nameservers = list(nameservers)
        self.timeout_s = timeout_s
        self._resolver: aiodns.DNSResolver | None = None
        self._slots = asyncio.Semaphore(MAX_LOOKUPS)

    async def start(self) -> None:
        """Opens the c-ares channel (the system's resolv.conf and hosts file unless nameservers are given)."""
        self._resolver = aiodns.DNSResolver(nameservers=self.nameservers or None, timeout=self.timeout_s / 2, tries=2)

    async def aclose(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def __call__(self, host: str, port: int) -> list[str]:
        """Every address of host (TCP), in the resolver's order; OSError if it has none."""
        async with self._slots:
            try:
                result = await self._resolver.getaddrinfo(host, port=port, type=socket.SOCK_STREAM)
            except aiodns.error.DNSError as e:
                raise OSError(e.args[1] if len(e.args) > 1 else str(e)) from None
        return list(dict.fromkeys(node.addr[0].decode() for node in result.nodes))


def forbidden_reason(address: IPAddress) -> str | None:
    """Why an address is not fetched by default ('loopback', 'private'...), or None for a public address."""
    embedded = getattr(address, "ipv4_mapped", None) or getattr(address, "sixtofour", None)
    teredo = getattr(address, "teredo", None)
    for candidate in filter(None, (embedded, teredo[1] if teredo else None)):
        reason = forbidden_reason(candidate)
        if reason:
            return reason
    for reason in ("loopback", "unspecified", "link_local", "multicast", "reserved", "private", "site_local"):
        if getattr(address, f"is_{reason}", False):
            return reason.replace("_", "-")
    if not address.is_global:
        return "non-global"
    return None


class AddressPolicy:
    """Which hosts and addresses image_uris may reach: public addresses, plus the operator's allow-lists."""

    def __init__(self, allow_hosts: Sequence[str] = (), allow_networks: Sequence = ()):
        self.allow_hosts = tuple(h.lower() for h in allow_hosts)
        self.allow_networks = tuple(allow_networks)

    def host_allowed(self, host: str) -> bool:
        """True if host is allow-listed by name ('.example.com' entries allow every subdomain)."""
        host = host.lower().rstrip(".")
        return any(host == entry or (entry.startswith(".") and host.endswith(entry)) for entry in self.allow_hosts)

    def check(self, host: str, address: str) -> str | None:
        """None if `host` at `address` may be fetched, else the reason it may not."""
        if self.host_allowed(host):
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        if any(ip in network for network in self.allow_networks):
            return None
        reason = forbidden_reason(ip)
        return f"a {reason} address" if reason else None


def decode_data_uri(uri: str, *, max_bytes: int, label: str) -> bytes:
    """The bytes of a data:image/...;base64, URI; RequestError 422 if malformed or over max_bytes."""
    if len(uri) > 64 + (max_bytes * 4) // 3 + 4:  # before decoding anything
        raise RequestError(422, f"{label}: data URI is larger than {max_bytes} bytes")
    match = _DATA_URI.fullmatch(uri)
    if match is None:
        raise RequestError(422, f"{label}: a data URI must look like data:image/png;base64,<base64 data>")
    payload = re.sub(r"\s+", "", match.group(3))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{label}: data URI payload is not valid base64") from None
    if len(data) > max_bytes:
        raise RequestError(422, f"{label}: data URI is larger than {max_bytes} bytes")
    return data


class ImageFetcher:
    """Fetches image_uris concurrently under the SSRF policy and the byte, time and redirect limits."""

    def __init__(self, settings: Settings, *, resolver: Resolver | None = None):
        self.settings = settings
        self.policy = AddressPolicy(settings.allow_hosts, settings.allow_networks)
        self._dns = None if resolver else DnsResolver(settings.dns_servers, settings.dns_timeout_s)
        self.resolver = resolver or self._dns
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Opens the resolver and the HTTP client (no proxies from the environment, no keep-alive: each hop connects
        anew)."""
        if self._dns is not None:
            await self._dns.start()
        self._client = httpx.AsyncClient(
            trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(self.settings.fetch_timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
            headers={"User-Agent": "klein-serve", "Accept": "image/*", "Accept-Encoding": "gzip, deflate"},
        )

    async def aclose(self) -> None:
        """Closes the HTTP client and the resolver."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._dns is not None:
            await self._dns.aclose()

    async def fetch_all(self, uris: Sequence[str]) -> list[bytes]:
        """The bytes behind each URI, fetched concurrently; the first failure (in order) is raised."""
        if not uris:
            return []
        tasks = [asyncio.ensure_future(self.fetch(uri, label=f"image_uris[{i}]")) for i, uri in enumerate(uris)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
        for task in tasks:
            if task in done and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]

    async def fetch(self, uri: str, *, label: str) -> bytes:
        """The bytes behind one http(s):// or data: URI."""
        if uri[:5].lower() == "data:":  # base64 of up to max_image_bytes: off the event loop
            return await asyncio.to_thread(decode_data_uri, uri, max_bytes=self.settings.max_image_bytes, label=label)
        url = _parse_http_url(uri, label)
        try:
            async with asyncio.timeout(self.settings.fetch_timeout_s):
                return await self._fetch_http(url, label)
        except TimeoutError:
            raise RequestError(422, f"{label}: fetching {_show(url)} took longer than "
                                    f"{self.settings.fetch_timeout_s:g} s") from None

    async def _fetch_http(self, url: httpx.URL, label: str) -> bytes:
        for _ in range(self.settings.max_redirects + 1):
            addresses = await self._checked_addresses(url, label)
            response_or_next = await self._get(url, addresses, label)
            if isinstance(response_or_next, bytes):
                return response_or_next
            url = response_or_next
        raise RequestError(422, f"{label}: more than {self.settings.max_redirects} redirects")

    async def _checked_addresses(self, url: httpx.URL, label: str) -> list[str]:
        """Resolves url's host and checks every answer; any forbidden answer refuses the whole URI."""
        host = _hostname(url)
        literal = _ip_literal(host)
        if literal is not None:
            addresses = [literal]  # no DNS
        else:
            timeout_s = self.settings.dns_timeout_s
            try:
                async with asyncio.timeout(timeout_s):
                    addresses = await self.resolver(host, _port(url))
            except TimeoutError:
                raise RequestError(422, f"{label}: host {host!r} could not be resolved within {timeout_s:g} s") \
                    from None
            except (OSError, UnicodeError) as e:
                raise RequestError(422, f"{label}: host {host!r} could not be resolved ({e})") from None
        if not addresses:
            raise RequestError(422, f"{label}: host {host!r} has no address")
        for address in addresses:
            reason = self.policy.check(host, address)
            if reason:
                raise RequestError(422, f"{label}: host {host!r} resolves to {reason}, which this server "
                                        "does not fetch from")
        return addresses

    async def _get(self, url: httpx.URL, addresses: list[str], label: str) -> bytes | httpx.URL:
        """One hop: the body of a 200, or the next URL of a redirect."""
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._get_from(url, address, label)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last_error = e  # try the next checked address
            except httpx.HTTPError as e:
                raise RequestError(422, f"{label}: fetching {_show(url)} failed: {_describe(e)}") from None
            except (httpx.InvalidURL, UnicodeError) as e:  # httpx parses a redirect's Location as it answers
                raise RequestError(422, f"{label}: {_show(url)} redirects to a malformed URL ({_describe(e)})") \
                    from None
        raise RequestError(422, f"{label}: could not connect to {_show(url)}: {_describe(last_error)}")

    async def _get_from(self, url: httpx.URL, address: str, label: str) -> bytes | httpx.URL:
        pinned = url.copy_with(host=address)
        host = _hostname(url)
        extensions = {"sni_hostname": host} if url.scheme == "https" and host != address else {}
        headers = {"Host": url.netloc.decode("ascii")}
        async with self._client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
            self._check_peer(response, host, label)
            if response.status_code in _REDIRECTS and "location" in response.headers:
                try:
                    target = str(url.join(response.headers["location"]))
                except (httpx.InvalidURL, ValueError, TypeError) as e:
                    raise RequestError(422, f"{label}: {_show(url)} redirects to a malformed URL ({e})") from None
                return _parse_http_url(target, f"{label} (redirect)")
            if response.status_code != 200:
                raise RequestError(422, f"{label}: {_show(url)} answered HTTP {response.status_code}")
            return await self._read_bounded(response, url, label)

    def _check_peer(self, response: httpx.Response, host: str, label: str) -> None:
        """Re-checks the address the socket is actually connected to."""
        stream = response.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        if peer and self.policy.check(host, peer[0]):
            raise RequestError(422, f"{label}: connected to a forbidden address")

    async def _read_bounded(self, response: httpx.Response, url: httpx.URL, label: str) -> bytes:
        """The body, decompressed by hand so that neither the bytes received nor those decoded pass the limit."""
        limit = self.settings.max_image_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(422, f"{label}: {_show(url)} is larger than {limit} bytes (Content-Length {declared})")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "", *_ENCODINGS):
            raise RequestError(422, f"{label}: {_show(url)} came with Content-Encoding {encoding[:40]!r}; only gzip "
                                    "and deflate are read")
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32) if encoding in _ENCODINGS else None  # gzip or zlib
        chunks, received, size = [], 0, 0
        try:
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if decoder is not None:
                    chunk = decoder.decompress(chunk, limit + 1 - size)
                size += len(chunk)
                if received > limit or size > limit:
                    raise RequestError(422, f"{label}: {_show(url)} is larger than {limit} bytes")
                chunks.append(chunk)
            if decoder is not None:
                chunks.append(decoder.flush())
                if size + len(chunks[-1]) > limit:
                    raise RequestError(422, f"{label}: {_show(url)} is larger than {limit} bytes")
        except zlib.error as e:
            raise RequestError(422, f"{label}: {_show(url)} is not valid {encoding} data ({e})") from None
        return b"".join(chunks)


def _parse_http_url(uri: str, label: str) -> httpx.URL:
    """An absolute http(s) URL with a host and no credentials; RequestError 422 otherwise."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme not in ("http", "https"):
        raise RequestError(422, f"{label}: only http://, https:// and data:image/...;base64, URIs are accepted, "
                                f"got {_truncate(uri)!r}")
    try:
        url = httpx.URL(uri)
        url.host  # noqa: B018 - decodes an IDNA host: a malformed A-label such as xn-- raises here
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise RequestError(422, f"{label}: malformed URL ({_truncate(str(e))})") from None
    if not url.host:
        raise RequestError(422, f"{label}: URL {_truncate(uri)!r} has no host")
    if url.userinfo:
        raise RequestError(422, f"{label}: URLs with credentials are not fetched")
    return url


def _ip_literal(host: str) -> str | None:
    """The address a host written as an IP means (IPv6, dotted IPv4 or its legacy numeric forms), else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            pass
    return None


def _hostname(url: httpx.URL) -> str:
    """The host as sent on the wire: IDNA-encoded, IPv6 without brackets."""
    return url.raw_host.decode("ascii")


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _show(url: httpx.URL) -> str:
    return _truncate(str(url.copy_with(query=None, fragment=None)))


def _truncate(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(error: Exception | None) -> str:
    return (str(error) or type(error).__name__)[:200] if error else "no address"

