"""`tsh login`, `tsh logout`, `tsh status`.

    tsh login --proxy=HOST:PORT [--user=NAME] [--insecure | --ca-pin=sha256:HEX]
              [--ttl=DURATION] [--signup-token=TOKEN]

asks for the password (and the TOTP code when the cluster or the account needs one) on the
terminal, or reads them from standard input, one line each, when it is not a terminal;
generates an ECDSA P-256 key here (it never leaves this machine), sends its public half and
saves the certificate the cluster issues in a profile (`dataplane.tsh.profile`). With
`--signup-token` (the line `tctl users add` prints) it first sets the new user's password,
which the administrator never sees, and enrolls TOTP when the cluster asks for it.

Never prints, logs or saves a password, TOTP code or signup token.
"""

from __future__ import annotations

import argparse
import getpass
import hmac
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TextIO

from dataplane.cluster.identity import JoinError, ca_fingerprint, normalize_pin
from dataplane.tsh.client import (
    ProxyClient,
    check_certificate,
    join_host_port,
    parse_proxy,
    public_key_pem,
    untrusted_hint,
    unverified_context,
    verified_context,
)
from dataplane.tsh.errors import TshError, UsageError, command
from dataplane.tsh.profile import Profile, ProfileData, ProfileStore, now_utc, profile_name
from dataplane.tsh.prompt import Prompter
from dataplane.tsh.session import forget_db, status_lines
from schemas.api import LoginRequest, Ping, SignupRequest, SignupStart
from schemas.durations import DurationError, parse_duration
from schemas.identity import IdentityError
from transport import tls
from transport.http import ApiError, HttpTlsError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "login",
        help="log in to a cluster and get a short-lived certificate",
        description="Log in to the cluster behind a proxy: the password (and TOTP code) are "
        "read from the terminal, or one line each from standard input when it is not a "
        "terminal. The key is made here and never leaves this machine.",
    )
    p.add_argument("--proxy", metavar="HOST:PORT", help="the proxy's web address (port 3080 "
                   "if left out); default: the proxy of the current profile")
    p.add_argument("--user", metavar="NAME", help="your user name (default: the current "
                   "profile's, else your OS login)")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--insecure", action="store_true", help="accept the proxy's "
                       "self-signed certificate and pin the host CA it presents (test setups "
                       "only)")
    trust.add_argument("--ca-pin", metavar="sha256:HEX", help="trust the proxy when its host "
                       "CA has this fingerprint (`tctl status` prints it as \"CA pin\")")
    p.add_argument("--ttl", metavar="DURATION", help="how long the certificate should be "
                   "valid (e.g. 1h, 30m); the cluster may give less")
    p.add_argument("--signup-token", metavar="TOKEN", help="the token from `tctl users add`: "
                   "choose your password (and enroll TOTP) before logging in")
    p.set_defaults(func=run_login)

    out = sub.add_parser(
        "logout",
        help="remove the current profile and its database logins",
        description="Remove the current profile (or that of --proxy): its key, certificates, "
        "and the pg_service.conf sections of its databases.",
    )
    out.add_argument("--proxy", metavar="HOST:PORT", help="the profile of this proxy instead "
                     "of the current one")
    out.add_argument("--all", action="store_true", help="remove every profile")
    out.set_defaults(func=run_logout)

    st = sub.add_parser(
        "status",
        help="show who you are logged in as, until when, and your databases",
        description="Show the current profile (proxy, user, cluster, roles, valid until, "
        "logged-in databases) and the other profiles on this machine.",
    )
    st.set_defaults(func=run_status)


# --- login ----------------------------------------------------------------------------------


@dataclass
class LoginOptions:
    proxy: str
    user: str | None = None
    insecure: bool = False
    ca_pin: str | None = None
    ttl: timedelta | None = None
    signup_token: str | None = None
    prompter: Prompter = field(default_factory=Prompter)
    store: ProfileStore = field(default_factory=ProfileStore)
    err: TextIO | None = None


def _pin(text: str) -> str:
    try:
        return normalize_pin(text)
    except JoinError as exc:
        raise UsageError(f"--ca-pin: {exc}") from None


def _host_ca_pin(ping: Ping, address: str) -> str:
    try:
        return ca_fingerprint(ping.host_ca.encode())
    except (IdentityError, IndexError):
        raise TshError(
            f"the proxy {address} sent no readable host CA certificate in its ping answer; "
            "check that the address is a teleport-db proxy"
        ) from None


def _trust_proxy(
    options: LoginOptions, host: str, port: int, address: str, pinned: bytes | None
) -> tuple[Ping, ProxyClient, str]:
    """Ping the proxy, decide whether it is trusted, and return the client to log in with
    (verifying the proxy with the host CA that is pinned from now on)."""
    err = options.err or sys.stderr
    if options.insecure or options.ca_pin:
        pin = _pin(options.ca_pin) if options.ca_pin else None
        ping = ProxyClient(host, port, unverified_context()).ping()
        host_ca = ping.host_ca.encode()
        got = _host_ca_pin(ping, address)
        if not hmac.compare_digest(got, ping.ca_fingerprints.host):
            raise TshError(
                f"the proxy {address} sent a host CA ({got}) that is not the one it names in "
                f"its fingerprints ({ping.ca_fingerprints.host}); not logging in"
            )
        if pin is not None and not hmac.compare_digest(got, pin):
            raise TshError(
                f"the proxy {address} presents host CA {got}, not the pin {pin} you gave: "
                "someone may be in the middle, or the pin is from another cluster; check "
                "`tctl status` on the auth host"
            )
        if pin is None:
            print(
                f"WARNING: --insecure: trusting the host CA {got} that {address} presented, "
                "without verification (test setups only). It is pinned in your profile; "
                "compare it with the \"CA pin\" of `tctl status` on the auth host.",
                file=err,
            )
        trust = "ca-pin" if pin else "insecure"
        client = ProxyClient(host, port, verified_context(host_ca, system=False))
        return ping, client, trust
    context = verified_context(pinned)
    client = ProxyClient(host, port, context)
    try:
        ping = client.ping()
    except HttpTlsError as exc:
        raise untrusted_hint(exc, address, pinned is not None) from None
    pinned_now = verified_context(ping.host_ca.encode())
    trust = "pinned" if pinned else "system"
    return ping, ProxyClient(host, port, pinned_now), trust


def _signup(options: LoginOptions, client: ProxyClient, user: str | None, err: TextIO
            ) -> tuple[str, str, bool]:
    """Set the new user's password with the signup token; (user, password, TOTP enrolled)."""
    assert options.signup_token is not None
    challenge = client.signup_start(SignupStart(token=options.signup_token))
    if user is not None and user != challenge.user:
        raise TshError(
            f"this signup token is for user {challenge.user!r}, not {user!r}: run the command "
            f"again with --user={challenge.user}"
        )
    name = challenge.user
    print(f"Signing up {name}: choose a password (the administrator never sees it).", file=err)
    password = options.prompter.new_password(name)
    code: str | None = None
    if challenge.totp_secret:
        required = challenge.second_factor == "otp"
        print(
            "\nThis cluster "
            + ("requires" if required else "offers")
            + " a second factor. Add this secret to your authenticator app (or scan the "
            "URI as a QR code):\n\n"
            f"  secret: {challenge.totp_secret}\n"
            f"  URI:    {challenge.totp_uri}\n",
            file=err,
        )
        question = "Enter the code the app shows" + ("" if required else " (empty to skip)")
        answer = options.prompter.secret(question + ": ", "TOTP code", allow_empty=not required)
        code = answer.strip().replace(" ", "") or None
    done = client.signup(SignupRequest(token=options.signup_token, password=password, totp=code))
    print(f"Password set for {done.user}" + (", TOTP enrolled." if done.totp_enrolled else "."),
          file=err)
    return done.user, password, done.totp_enrolled


def login(options: LoginOptions) -> Profile:
    """Log in (signing up first with a token) and save the profile; returns it."""
    err = options.err or sys.stderr
    host, port = parse_proxy(options.proxy)
    address = join_host_port(host, port)
    store = options.store
    name = profile_name(address)
    existing = store.load(name)
    pinned: bytes | None = None
    if existing is not None and existing.host_ca_path.is_file():
        pinned = existing.host_ca_path.read_bytes()

    ping, client, trust = _trust_proxy(options, host, port, address, pinned)

    user = options.user
    just_enrolled = False
    if options.signup_token:
        user, password, just_enrolled = _signup(options, client, user, err)
    else:
        user = user or getpass.getuser()
        password = options.prompter.secret(f"Password for {user}@{address}: ", "password")

    totp: str | None = None
    if just_enrolled:
        totp = options.prompter.totp(
            "Enter the NEXT code from your app (the one just used is spent): "
        )
    elif ping.second_factor == "otp":
        totp = options.prompter.totp()

    key = tls.new_private_key()
    ttl = int(options.ttl.total_seconds()) if options.ttl else None
    request = LoginRequest(user=user, password=password, totp=totp,
                           public_key=public_key_pem(key), ttl_seconds=ttl)
    try:
        response = client.login(request)
    except ApiError as exc:
        if exc.code != "second_factor_required" or totp is not None:
            raise
        request.totp = options.prompter.totp()
        response = client.login(request)

    identity = check_certificate(response.cert, response.user_ca, key, "user", now_utc())
    if identity.username != user:
        raise TshError(
            f"the cluster issued a certificate for {identity.username!r}, not {user!r}; "
            "nothing was saved"
        )

    data = ProfileData(
        proxy=address,
        user=user,
        cluster=response.cluster,
        roles=list(identity.roles),
        expires=identity.expires,
        trust=trust,
        postgres_addr=address,
    )
    profile = store.new(data)
    with store.locked():
        old = store.load(name)
        if old is not None and (old.data.user != user or old.data.cluster != data.cluster):
            # A profile is one user of one cluster: the other one's databases go with it.
            for record in old.db_logins().values():
                forget_db(old, record)
        profile.write_file(profile.key_path, tls.private_key_pem(key))
        profile.write_file(profile.cert_path, response.cert.encode())
        profile.write_file(profile.host_ca_path, "".join(response.host_ca).encode()
                           if response.host_ca else ping.host_ca.encode())
        profile.write_file(profile.user_ca_path, "".join(response.user_ca).encode())
        profile.save()
        store.set_current(name)
    return profile


def _ttl(text: str | None) -> timedelta | None:
    if text is None:
        return None
    try:
        ttl = parse_duration(text)
    except DurationError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if ttl < timedelta(seconds=1):
        raise UsageError(f"--ttl must be at least 1s, got {text!r}")
    return ttl


@command
def run_login(args: argparse.Namespace) -> int:
    store = ProfileStore()
    proxy, user = args.proxy, args.user
    if proxy is None:
        current = store.current()
        if current is None:
            raise UsageError(
                "--proxy is required for the first login: tsh login --proxy=HOST:PORT "
                "--user=NAME"
            )
        proxy = current.data.proxy
        user = user or current.data.user
    profile = login(
        LoginOptions(
            proxy=proxy,
            user=user,
            insecure=args.insecure,
            ca_pin=args.ca_pin,
            ttl=_ttl(args.ttl),
            signup_token=args.signup_token,
            store=store,
        )
    )
    print("\n".join(status_lines(profile)))
    return 0


# --- logout, status -------------------------------------------------------------------------


def logout(store: ProfileStore, profile: Profile) -> None:
    """Remove a profile with its databases' pg_service.conf sections."""
    with store.locked():
        for record in profile.db_logins().values():
            forget_db(profile, record)
        profile.remove()
        if store.current_name() == profile.name:
            store.set_current(None)


@command
def run_logout(args: argparse.Namespace) -> int:
    store = ProfileStore()
    if args.all:
        profiles = [p for p in (store.load(n) for n in store.names()) if p is not None]
    elif args.proxy:
        host, port = parse_proxy(args.proxy)
        found = store.load(profile_name(join_host_port(host, port)))
        profiles = [found] if found is not None else []
    else:
        current = store.current()
        profiles = [current] if current is not None else []
    if not profiles:
        print("You are not logged in.")
        return 0
    for profile in profiles:
        logout(store, profile)
        print(f"Logged out {profile.data.user} from {profile.data.proxy}.")
    return 0


@command
def run_status(args: argparse.Namespace) -> int:
    store = ProfileStore()
    current = store.current()
    others = [n for n in store.names() if current is None or n != current.name]
    if current is None and not others:
        raise TshError(
            "you are not logged in: run `tsh login --proxy=HOST:PORT --user=NAME` first"
        )
    if current is not None:
        print("\n".join(status_lines(current)))
    for n in others:
        other = store.load(n)
        if other is not None:
            print()
            print("\n".join(status_lines(other, current=False)))
    if current is not None:
        current.require_valid()
    return 0
