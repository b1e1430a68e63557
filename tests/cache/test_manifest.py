import os

import pytest
from PIL import Image

from pipeline.cache.manifest import build_manifest
from pipeline.core.errors import InputError


def make_tree(root):
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    for rel in ["b/deep/x.JPG", "a/z.png", "a/y.WebP", "c.bmp", "b/w.jpeg"]:
        Image.new("RGB", (20, 20), (len(rel) * 10, 0, 0)).save(root / rel, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[rel.rsplit(".", 1)[1].lower()])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_folder_is_searched_recursively_case_insensitive_and_sorted(tmp_path):
    m = build_manifest(make_tree(tmp_path), progress=False)
    assert m.paths == ("a/y.WebP", "a/z.png", "b/deep/x.JPG", "b/w.jpeg", "c.bmp")
    assert m.root == tmp_path
    assert build_manifest(tmp_path, progress=False).hash == m.hash  # deterministic


def test_list_file_keeps_its_order_and_resolves_relative_paths(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "list.txt").write_text("# comment\nc.bmp\n\na/z.png\n")
    m = build_manifest(tmp_path / "list.txt", progress=False)
    assert m.paths == ("c.bmp", "a/z.png")
    assert m.abspath(1) == tmp_path / "a" / "z.png"


def test_list_with_duplicates_or_nothing_is_refused(tmp_path):
    (tmp_path / "dup.txt").write_text("a.png\nb.png\na.png\n")
    with pytest.raises(InputError, match=r"dup.txt:3: duplicate entry 'a.png' \(first on line 1\)"):
        build_manifest(tmp_path / "dup.txt", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        build_manifest(tmp_path / "empty", progress=False)
    with pytest.raises(InputError, match="no such folder or list file"):
        build_manifest(tmp_path / "nowhere", progress=False)


def test_content_hash_changes_with_content_even_at_same_size_and_list(tmp_path):
    make_tree(tmp_path)
    before = build_manifest(tmp_path, "content", progress=False).hash
    target = tmp_path / "c.bmp"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    after = build_manifest(tmp_path, "content", progress=False).hash
    assert after != before
    (tmp_path / "c.bmp").rename(tmp_path / "d.bmp")  # same bytes, another name
    assert build_manifest(tmp_path, "content", progress=False).hash != after


def test_content_hash_is_portable_across_copies_but_stat_hash_is_not(tmp_path):
    a, b = make_tree(tmp_path / "a"), tmp_path / "b"
    b.mkdir()
    make_tree(b)
    for p in b.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(1, 1))
    assert build_manifest(a, "content", progress=False).hash == build_manifest(b, "content", progress=False).hash
    assert build_manifest(a, "stat", progress=False).hash != build_manifest(b, "stat", progress=False).hash


def test_content_hashes_are_memoized_by_path_size_mtime_inode(tmp_path):
    make_tree(tmp_path)
    first = build_manifest(tmp_path, "content", progress=False).hash
    target = tmp_path / "c.bmp"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    with open(target, "r+b") as f:  # rewrite in place: same inode, same size
        f.write(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime: the memo answers
    assert build_manifest(tmp_path, "content", progress=False).hash == first
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert build_manifest(tmp_path, "content", progress=False).hash != first


def test_folders_are_searched_through_links_but_never_round_a_cycle(tmp_path):
    from pipeline.core.files import list_images

    for folder, name in (("a", "x.png"), ("d", "p.png"), ("e", "q.png"), (".hidden", "y.png")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / name)
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # a link back up the tree: a cycle
    (tmp_path / "b").symlink_to(tmp_path / "a")  # a second way into a/: listed, as it always was
    (tmp_path / "c").symlink_to(tmp_path / ".hidden")  # a hidden folder is skipped, a visible link to it is not
    (tmp_path / "d" / "to_e").symlink_to(tmp_path / "e")  # two siblings linking to each other: a cycle of two
    (tmp_path / "e" / "to_d").symlink_to(tmp_path / "d")
    root, paths = list_images(tmp_path)
    assert root == tmp_path
    assert paths == ["a/x.png", "b/x.png", "c/y.png", "d/p.png", "d/to_e/q.png", "e/q.png", "e/to_d/p.png"]
