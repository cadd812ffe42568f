"""Accounts, invite tokens, the server secret and CSRF tokens: plain functions, no HTTP.

Passwords are stored as argon2id hashes; invite tokens (also the API's bearer tokens)
as their SHA-256, so a copy of the database logs nobody in. Pages use a signed session
cookie (Starlette's SessionMiddleware, itsdangerous) that carries the user id and a
CSRF token; every state-changing request authenticated by that cookie must echo the
token (form field `csrf_token` or header `X-CSRF-Token`). A bearer token is not an
ambient credential, so requests that carry one need no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignkit.app.db import User

ROLES = ("admin", "annotator")
# Secrets copied from examples; the server refuses them as it refuses an empty one.
KNOWN_SECRETS = {"secret", "changeme", "change-me", "change_me", "default", "password", "dev", "test",
                 "please-change-me", "your-secret-key", "alignkit"}
MIN_SECRET_LENGTH = 32


class SecretError(ValueError):
    pass


def check_secret(secret: str | None, source: str) -> str:
    """The session-signing secret, or a SecretError saying why it cannot be used."""
    if not secret:
        raise SecretError(f"{source} is empty: set it to a random string, e.g. "
                          "`export ALIGNKIT_APP_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`")
    if secret.strip().lower() in KNOWN_SECRETS or len(set(secret)) < 8:
        raise SecretError(f"{source} is a default or trivial value; use a random string")
    if len(secret) < MIN_SECRET_LENGTH:
        raise SecretError(f"{source} has {len(secret)} characters; use at least {MIN_SECRET_LENGTH} random ones")
    return secret


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError

    if not stored_hash:
        return False
    try:
        return _hasher().verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(24)


def create_user(session: Session, name: str, role: str = "annotator", password: str | None = None) -> tuple[User, str]:
    """A new account and its invite token (returned once; only its digest is stored)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"user name {name!r}: use 1-100 letters, digits, '-', '_' or '.'")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise ValueError(f"a user named {name!r} exists")
    token = new_token()
    user = User(name=name, role=role, password_hash=hash_password(password) if password else None,
                token_hash=token_digest(token))
    session.add(user)
    session.commit()
    return user, token


def new_invite(session: Session, user: User) -> str:
    """Replace `user`'s invite token (the old one stops working)."""
    token = new_token()
    user.token_hash = token_digest(token)
    session.commit()
    return token


def user_by_password(session: Session, name: str, password: str) -> User | None:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        _hasher().hash(password)  # same work either way: timing does not tell which names exist
        return None
    return user if verify_password(user.password_hash, password) else None


def user_by_digest(session: Session, digest: str):
    """The account whose token has this SHA-256 digest, as a row (id, name, role), or None."""
    return session.execute(select(User.id, User.name, User.role).where(User.token_hash == digest)).first()


def user_by_token(session: Session, token: str):
    """The account of a bearer / invite token as a row (id, name, role), or None."""
    return user_by_digest(session, token_digest(token)) if token else None


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected, given)
