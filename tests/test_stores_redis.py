from __future__ import annotations

import uuid

import pytest

from statekit.stores import Store
from statekit.stores.redis import RedisStore
from statekit.testing import RedisServer

from .store_contract import SharedStoreContract


class TestRedisStore(SharedStoreContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.server = redis_server

    def make_store(self) -> Store:
        return RedisStore(self.server.url, prefix=f"t{uuid.uuid4().hex[:6]}")
