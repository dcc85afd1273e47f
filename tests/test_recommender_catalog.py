"""The recommender's catalog (stable rows, immutable snapshots, fsync'd JSONL journal, titles
embedded by the real sentence encoder) and its bounded per-user history."""
from __future__ import annotations

import json

import numpy as np
import pytest

from services.recommender.catalog import Catalog, ItemRecord, read_jsonl
from services.recommender.history import UserHistory
from shared.text import TextEncoder
from tests.recommender_fixtures import exported_text_encoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(exported_text_encoder()[0])


def items(*rows):
    return [ItemRecord(i, t, c, p) for i, t, c, p in rows]


def test_rows_are_stable_and_snapshots_never_change_under_a_reader(tmp_path, encoder):
    seed = tmp_path / "catalog.jsonl"
    seed.write_text("".join(it.to_json() + "\n" for it in items(
        ("milk", "Organic whole milk 1 litre", "dairy", 1.5),
        ("drill", "Cordless drill 18V", "tools", 89.0))))
    cat = Catalog(tmp_path / "journal" / "items.jsonl", encoder.encode)
    first = cat.ensure_loaded(seed=seed)
    assert (first.size, first.row("milk"), first.row("drill")) == (2, 0, 1)
    assert cat.path.is_file()  # the journal was seeded from the version's catalog.jsonl
    np.testing.assert_allclose(first.text_vectors(np.array([0])), encoder.encode(["Organic whole milk 1 litre"]),
                               atol=1e-6)

    snap = cat.upsert(items(("tea", "Green tea bags, 80 pack", "drinks", 3.2),
                            ("milk", "Semi-skimmed milk 2 litres", "dairy", 2.0)))
    assert cat.current is first  # built, not yet published
    cat.publish(snap)
    assert (snap.size, snap.row("tea"), snap.row("milk")) == (3, 2, 0)
    assert first.row("tea") is None  # a new row is invisible to older snapshots
    # the replaced item: new price and re-embedded title in the new snapshot, old ones in the old
    assert (float(first.price[0]), float(snap.price[0])) == (1.5, 2.0)
    np.testing.assert_allclose(snap.text_vectors(np.array([0])), encoder.encode(["Semi-skimmed milk 2 litres"]),
                               atol=1e-6)
    np.testing.assert_allclose(first.text_vectors(np.array([0])), encoder.encode(["Organic whole milk 1 litre"]),
                               atol=1e-6)
    assert snap.revision[0] == snap.revision[2] == snap.generation > first.revision[1]
    assert snap.category_of(2) == "drinks" and cat.title("milk") == "Semi-skimmed milk 2 litres"

    # many appends later, old snapshots still read their own rows
    for i in range(3000):
        cat.publish(cat.upsert(items((f"x{i}", "Green tea bags, 80 pack", "drinks", float(i)))))
    assert cat.current.size == 3003 and first.size == 2 and float(snap.price[2]) == pytest.approx(3.2)
    assert len(cat.current.texts) == 4  # one embedding per distinct title ever seen


def test_the_journal_is_replayed_after_a_restart_and_a_torn_line_is_skipped(tmp_path, encoder):
    seed = tmp_path / "catalog.jsonl"
    seed.write_text(items(("a", "Claw hammer", "tools", 9.0))[0].to_json() + "\n")
    cat = Catalog(tmp_path / "items.jsonl", encoder.encode)
    cat.ensure_loaded(seed=seed)
    cat.publish(cat.upsert(items(("b", "Green tea", "drinks", 2.0), ("a", "Claw hammer, fibreglass", "tools", 11.0))))
    with open(cat.path, "a") as f:
        f.write('{"item_id": "c", "title": "half a li')  # a crash in the middle of an append
    again = Catalog(tmp_path / "items.jsonl", encoder.encode)
    snap = again.ensure_loaded(seed=None)
    assert [snap.ids[r] for r in range(snap.size)] == ["a", "b"]
    assert float(snap.price[snap.row("a")]) == 11.0 and again.title("a") == "Claw hammer, fibreglass"
    lines = [json.loads(x) for x in cat.path.read_text().splitlines()]
    assert [x["item_id"] for x in lines] == ["a", "b", "a"]  # the torn fragment was cut off
    again.publish(again.upsert(items(("d", "Green tea", "drinks", 2.5))))  # appends on a line of its own
    third = Catalog(tmp_path / "items.jsonl", encoder.encode).ensure_loaded()
    assert [third.ids[r] for r in range(third.size)] == ["a", "b", "d"]
    # a bad line in the middle is an error naming the line, not silently lost data
    cat.path.write_text('{"item_id": "a", "title": "t", "price": -1}\n' + lines[1].__repr__() + "\n")
    with pytest.raises(ValueError, match=":1: bad catalog line"):
        read_jsonl(cat.path)


def test_a_journal_of_mostly_replaced_items_is_compacted_at_load(tmp_path, encoder):
    path = tmp_path / "items.jsonl"
    path.write_text("".join(ItemRecord(f"i{n % 100}", f"Green tea, pack of {n % 7}", "drinks", float(n)).to_json() + "\n"
                            for n in range(12_000)))
    snap = Catalog(path, encoder.encode).ensure_loaded()
    assert snap.size == 100 and len(path.read_text().splitlines()) == 100
    assert float(snap.price[snap.row("i99")]) == 11_999.0  # the last line of each item won


def test_no_journal_and_no_seed_is_an_error(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="no catalog journal"):
        Catalog(tmp_path / "nothing.jsonl", encoder.encode).ensure_loaded(seed=tmp_path / "missing.jsonl")


def test_history_is_most_recent_first_and_bounded():
    h = UserHistory(max_users=2, max_recent=3, max_purchased=2)
    for item, bought in (("a", False), ("b", True), ("c", False), ("a", True), ("d", True)):
        h.record("u1", item, purchase=bought)
    assert h.recent("u1") == ["d", "a", "c"]  # a repeat counts again (as in training rows); older ones fall off
    assert h.recent("u1", 2) == ["d", "a"]
    h.record("u1", "d", purchase=False)
    assert h.recent("u1") == ["d", "d", "a"]
    assert h.purchased("u1") == ["a", "d"]  # bounded to the 2 most recent purchases
    h.record("u2", "x", purchase=False)
    h.record("u1", "e", purchase=False)  # u1 is now the most recently active
    h.record("u3", "y", purchase=False)  # evicts the least recently active: u2
    assert "u2" not in h and "u1" in h and len(h) == 2
    assert h.recent("nobody") == [] and h.purchased("nobody") == []


def test_history_seeds_from_users_npz_without_overwriting_live_users(tmp_path):
    path = tmp_path / "users.npz"
    np.savez(path, user_ids=np.array(["u1", "u2"]), indptr=np.array([0, 4, 5], np.int64),
             item_ids=np.array(["a", "b", "a", "c", "z"]))
    h = UserHistory(max_users=10, max_recent=2, max_purchased=10)
    h.record("u2", "live", purchase=True)
    assert h.seed_npz(path) == 1
    assert h.recent("u1") == ["c", "a"]  # the 2 most recent, most recent first
    assert sorted(h.purchased("u1")) == ["a", "b", "c"]
    assert h.recent("u2") == ["live"]  # what the service saw wins over training data
    assert h.seed_npz(path) == 0  # each file once
    bad = tmp_path / "bad.npz"
    np.savez(bad, user_ids=np.array(["u"]), indptr=np.array([0, 9], np.int64), item_ids=np.array(["a"]))
    with pytest.raises(ValueError, match="indptr"):
        UserHistory().seed_npz(bad)


def test_replaced_titles_and_categories_are_reclaimed_and_old_snapshots_keep_theirs(tmp_path, encoder):
    from services.recommender.catalog import COMPACT_MIN_DEAD

    cat = Catalog(tmp_path / "items.jsonl", encoder.encode)
    seed = tmp_path / "catalog.jsonl"
    seed.write_text(items(("keep", "Claw hammer", "tools", 9.0))[0].to_json() + "\n")
    first = cat.ensure_loaded(seed=seed)
    cat.publish(cat.upsert(items(("a", "Title 0", "cat 0", 1.0), ("b", "Title b0", "cat b0", 1.0))))
    held = cat.current  # a reader holding a snapshot across compactions
    for n in range(1, COMPACT_MIN_DEAD + 3):  # each round leaves two dead titles and two dead categories
        cat.publish(cat.upsert(items(("a", f"Title {n}", f"cat {n}", 1.0), ("b", f"Title b{n}", f"cat b{n}", 1.0))))
    snap = cat.current
    assert cat.compactions >= 2  # text table and category list
    assert len(snap.texts) <= 3 + COMPACT_MIN_DEAD + 2 and len(snap.categories) <= 3 + COMPACT_MIN_DEAD + 2
    last = COMPACT_MIN_DEAD + 2
    for item, title, category in (("a", f"Title {last}", f"cat {last}"), ("b", f"Title b{last}", f"cat b{last}"),
                                  ("keep", "Claw hammer", "tools")):
        row = snap.row(item)
        np.testing.assert_allclose(snap.text_vectors(np.array([row])), encoder.encode([title]), atol=1e-6)
        assert snap.category_of(row) == category
    # the held snapshot still reads its own titles and categories (new arrays, never in place)
    np.testing.assert_allclose(held.text_vectors(np.array([held.row("a")])), encoder.encode(["Title 0"]), atol=1e-6)
    assert held.category_of(held.row("b")) == "cat b0" and first.category_of(0) == "tools"
    # a title seen again after compaction is embedded again (not a stale row)
    cat.publish(cat.upsert(items(("a", "Title 0", "cat 0", 1.0))))
    np.testing.assert_allclose(cat.current.text_vectors(np.array([cat.current.row("a")])),
                               encoder.encode(["Title 0"]), atol=1e-6)
