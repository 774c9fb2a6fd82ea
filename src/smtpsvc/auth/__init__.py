"""SMTP AUTH support: the accounts file with scrypt hashes (users) and failed-AUTH rate limiting (limiter)."""

from smtpsvc.auth.limiter import AuthLimiter
from smtpsvc.auth.users import UsersFileError, UserStore, hash_password, users_path, verify_password

__all__ = ["AuthLimiter", "UserStore", "UsersFileError", "hash_password", "users_path", "verify_password"]
