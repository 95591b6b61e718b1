"""The widget's editing rules on a Session, without Qt or a viewer: select, commit, runs' writes,
undo hooks, deleted layers, reopened label maps."""

from types import SimpleNamespace

import numpy as np

from napari_sam2unet.editing import Editor
from napari_sam2unet.provenance import RUNS_KEY
from napari_sam2unet.session import Session


def layer(name="labels", shape=(8, 8, 4)):
    return SimpleNamespace(name=name, data=np.zeros(shape, np.uint8), metadata={})


def editor_with(*layers):
    shown = list(layers)
    session = Session()
    session.objects.new(label=1)
    return Editor(session, alive=lambda lay: any(lay is other for other in shown)), shown


def write_square(editor, lay, k=1, value_slice=np.s_[2:5, 2:5]):
    """A run of the current object writing a square on slice k of axis 2."""
    obj = editor.current
    step = editor.begin_run(obj, lay, axis=2)
    mask = np.zeros(lay.data.shape[:2], bool)
    mask[value_slice] = True
    editor.write(obj, step, {k: mask})
    step.close()
    step.state_after = obj.state()
    step.record = {"operation": "run"}
    editor.push(step)
    return step


def test_commit_starts_the_next_free_label_and_undo_redo_move_between_objects():
    lay = layer()
    editor, _ = editor_with(lay)
    write_square(editor, lay)
    first = editor.current
    nxt = editor.commit(used={0, 1, 4})
    assert nxt.label == 5 and nxt.layer is lay and editor.current is nxt
    assert [r["operation"] for r in lay.metadata[RUNS_KEY]] == ["run", "commit"]
    outcome = editor.undo()
    assert outcome.done and outcome.text == "commit undone" and editor.current is first
    assert editor.redo().done and editor.current is nxt
    editor.select(0)
    assert editor.current is first


def test_a_runs_voxels_are_written_and_undo_takes_back_only_them():
    lay = layer()
    lay.data[0, 0, 1] = 7  # the user's own label elsewhere on the slice
    editor, _ = editor_with(lay)
    write_square(editor, lay)
    assert (lay.data[2:5, 2:5, 1] == 1).all()
    assert editor.undo().text == "run undone"
    assert not (lay.data == 1).any() and lay.data[0, 0, 1] == 7
    assert editor.redo().text == "run redone" and (lay.data[2:5, 2:5, 1] == 1).all()


def test_undo_after_the_labels_layer_was_deleted_says_so_and_reaches_older_steps():
    kept, deleted = layer("kept"), layer("gone")
    editor, shown = editor_with(kept, deleted)
    write_square(editor, kept)
    editor.current.layer = None  # the next run writes elsewhere
    write_square(editor, deleted, k=2)
    shown.remove(deleted)
    outcome = editor.undo()
    assert not outcome.done and "gone was deleted" in outcome.text and "cannot undo the run" in outcome.text
    assert editor.undo().text == "run undone" and not kept.data.any()  # the older step is reachable
    assert editor.undo().text == "nothing to undo"


def test_a_reopened_label_map_gives_its_objects_back_and_the_empty_object_moves_on():
    editor, shown = editor_with()
    reopened = layer("reopened")
    shown.append(reopened)
    editor.adopt_labels(reopened, {1: "liver", 2: "spleen"}, {2: (1, 2, 3)})
    objects = editor.session.objects.objects
    assert [(o.label, o.name) for o in objects[:2]] == [(1, "liver"), (2, "spleen")]
    assert objects[1].colour == (1, 2, 3)
    assert editor.current.label == 3 and editor.current.layer is reopened
    editor.adopt_labels(reopened, {1: "liver"}, {})  # the same map again: nothing doubles
    assert len(editor.session.objects.objects) == 3
