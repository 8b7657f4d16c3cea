from __future__ import annotations

from pathlib import Path

import pytest

from statekit.stores import Store
from statekit.stores.sqlite import SQLiteStore

from .store_contract import SharedStoreContract


class TestSQLiteStore(SharedStoreContract):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path

    def make_store(self) -> Store:
        return SQLiteStore(self.folder / "state.db")
