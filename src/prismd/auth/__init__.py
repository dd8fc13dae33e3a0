"""Users, passwords, login sessions, API tokens, and the checks every request goes through."""

from .service import (
    LOCAL_PRINCIPAL,
    AccountError,
    Auth,
    Principal,
    hash_password,
    new_token,
    token_hash,
)

__all__ = [
    "LOCAL_PRINCIPAL",
    "AccountError",
    "Auth",
    "Principal",
    "hash_password",
    "new_token",
    "token_hash",
]
