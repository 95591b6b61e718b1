"""The segment widget's model controls: the model list (with a model adapted to the chosen image),
a model file that wins over it, the backend kind, and where the last run ran."""

from magicgui.widgets import ComboBox, FileEdit, Label

from ._adapt import ADAPTED
from .backends import BACKEND_CHOICES
from .errors import Sam2UnetError
from .models import DEFAULT_MODEL, find_model, list_models


class ModelPicker:
    def __init__(self, widget) -> None:
        self.widget = widget
        self.model = ComboBox(label="Model", choices=self.choices, value=DEFAULT_MODEL)
        self.model_file = FileEdit(label="or model file", filter="*.onnx *.yaml", value="",
                                   tooltip="A .onnx (or its .yaml card); wins over the model list")
        self.backend = ComboBox(label="Backend", choices=list(BACKEND_CHOICES), value="auto")
        self.backend_info = Label(label="Runs on", value="(chosen at the first run)")
        self.model.changed.connect(self.on_choice)
        self.model_file.changed.connect(self.on_choice)

    def choices(self, _widget=None):
        # The bundled model first: a fine-tuned model never becomes the default by its name.
        # A model adapted to the chosen image is offered for that image only.
        names = {card.name for card in list_models()} - {DEFAULT_MODEL}
        image = getattr(self.widget, "image", None)  # not made yet while the controls are
        adapted = image is not None and self.widget.adapt.card_for(image.value) is not None
        return [DEFAULT_MODEL, *sorted(names), *([ADAPTED] if adapted else [])]

    def spec(self) -> str:
        """The model a run uses: the model file, else the list's choice (name or adapted card)."""
        path = str(self.model_file.value or "").strip()
        if path not in ("", "."):
            return path
        if self.model.value == ADAPTED:
            return str(self.widget.adapt.card_for(self.widget.image.value) or DEFAULT_MODEL)
        return self.model.value

    def on_choice(self, _value=None):
        """The chosen model's card threshold, for the next run only."""
        try:
            card = find_model(self.spec(), verify=False)
        except Sam2UnetError:
            return  # said at Run time, where the user can act on it
        threshold = self.widget.threshold
        with threshold.changed.blocked():
            threshold.value = card.threshold
