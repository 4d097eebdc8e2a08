"""Server settings: one frozen dataclass that klein-serve's flags (and KLEIN_* variables) fill in."""

from __future__ import annotations

import dataclasses
import ipaddress

from klein_jax.request import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO, MAX_REFERENCES

DEFAULT_MODEL_ID = "flux2-klein-4b"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything create_app needs besides the models; defaults are klein-serve's defaults."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    auth: bool = True  # False only with --no-auth
    timeout_s: float = 120.0  # queue wait + generation
    max_queue: int = 64  # requests waiting for the device
    max_batch: int = 4
    batch_wait_ms: float = 5.0  # how long a batch waits for more requests with the same shape
    aspect_ratios: tuple[str, ...] = tuple(ASPECT_RATIOS)
    compile_references: int = MAX_REFERENCES  # programs for up to this many references compile at start-up
    max_body_bytes: int = 64 * 1024 * 1024
    max_form_parts: int = 32
    max_image_bytes: int = 16 * 1024 * 1024  # per image: upload, fetched body or decoded data: URI
    max_image_pixels: int = 4096 * 4096
    max_decoded_pixels: int = 4 * 4096 * 4096  # decoded reference pixels held by all requests at once
    fetch_timeout_s: float = 10.0  # per image_uris entry, redirects included
    dns_servers: tuple[str, ...] = ()  # IP[:PORT] of the servers resolving image_uris hosts; () = resolv.conf
    dns_timeout_s: float = 5.0  # per image_uris host look-up
    drain_timeout_s: float = 30.0  # after SIGTERM: time to answer what is queued or running
    max_redirects: int = 3
    allow_hosts: tuple[str, ...] = ()  # host names image_uris may fetch whatever they resolve to
    allow_networks: tuple[IPNetwork, ...] = ()  # addresses image_uris may connect to even if private
    png_compress_level: int = 6  # zlib's default: level 1 saved ~50 ms of ~150 ms on a 1 MP image, doubling the file
    retry_after_s: int = 1  # Retry-After of a 503 for a full queue
    retry_after_not_ready_s: int = 5  # Retry-After of a 503 while programs compile
    playground: bool = True  # the HTML page at / (False with --no-playground)

    def __post_init__(self):
        for name in ("max_queue", "max_batch", "max_body_bytes", "max_form_parts", "max_image_bytes",
                     "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("timeout_s", "fetch_timeout_s", "dns_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.batch_wait_ms < 0 or self.max_redirects < 0:
            raise ValueError(f"batch_wait_ms={self.batch_wait_ms} and max_redirects={self.max_redirects} must be >= 0")
        if not self.aspect_ratios:
            raise ValueError("aspect_ratios is empty; enable at least one of " + ", ".join(ASPECT_RATIOS))
        unknown = [name for name in self.aspect_ratios if name not in ASPECT_RATIOS]
        if unknown:
            raise ValueError(f"aspect ratio(s) {', '.join(unknown)} not one of {', '.join(ASPECT_RATIOS)}")
        if self.auth and not self.api_keys:
            raise ValueError("no API key configured: set KLEIN_API_KEYS or KLEIN_API_KEYS_FILE, or pass --no-auth")
        if self.max_decoded_pixels < self.max_image_pixels:
            raise ValueError(f"max_decoded_pixels={self.max_decoded_pixels} must be at least max_image_pixels="
                             f"{self.max_image_pixels} (one image of the largest size)")
        if not 0 <= self.compile_references <= MAX_REFERENCES:
            raise ValueError(f"compile_references={self.compile_references} must be in 0..{MAX_REFERENCES}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level={self.png_compress_level} must be in 0..9")

    @property
    def default_aspect_ratio(self) -> str:
        """The aspect ratio of a request that names none (the contract's default)."""
        return DEFAULT_ASPECT_RATIO

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes to compile: powers of two below max_batch, and max_batch itself."""
        sizes = {self.max_batch}
        size = 1
        while size < self.max_batch:
            sizes.add(size)
            size *= 2
        return tuple(sorted(sizes))

    @property
    def base_url(self) -> str:
        """http://host:port as a client on this machine would write it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_aspect_ratios(value: str) -> tuple[str, ...]:
    """'all' or a comma-separated list of aspect-ratio names -> tuple of names (ValueError on unknown names)."""
    if value.strip() == "all":
        return tuple(ASPECT_RATIOS)
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [name for name in names if name not in ASPECT_RATIOS]
    if unknown or not names:
        raise ValueError(f"aspect ratios {value!r}: use 'all' or names from {', '.join(ASPECT_RATIOS)}")
    return names


def parse_networks(values: list[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings (or single addresses), each possibly comma-separated -> networks (ValueError if malformed)."""
    networks = []
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"network {part!r} is not an IP address or CIDR block such as 10.0.0.0/8") from None
    return tuple(networks)


def parse_dns_servers(value: str) -> tuple[str, ...]:
    """'IP[:PORT],...' ('[v6]:PORT' for IPv6 with a port) -> the same strings, checked (ValueError if malformed)."""
    servers = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        host, port = part, "53"
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ("53" if not rest else "x")
        elif part.count(":") == 1:
            host, port = part.split(":")
        try:
            ipaddress.ip_address(host)
            if not 0 < int(port) < 65536:
                raise ValueError(port)
        except ValueError:
            raise ValueError(f"DNS server {part!r} is not IP, IP:PORT or [IPv6]:PORT") from None
        servers.append(part)
    return tuple(servers)


def parse_hosts(values: list[str]) -> tuple[str, ...]:
    """Host names (each possibly comma-separated) -> lowercase names; '.example.com' allows every subdomain."""
    hosts = []
    for value in values:
        hosts.extend(p.strip().lower().rstrip(".") for p in value.split(",") if p.strip())
    return tuple(hosts)
