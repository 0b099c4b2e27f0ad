"""Keys typed in one burst with a key that opens a dialog go to that dialog.

Textual routes a key when the app takes it from the terminal (to the focused widget), but runs
a binding only when the key has bubbled back up to the app. Keys that arrive together with `a`
(add) are routed to the table before `a`'s binding has pushed the dialog; when they bubble
back the dialog is in front, none of its bindings match, and they were dropped (`aHello`
opened an empty dialog). A key that comes back to the app while another screen is in front
than when it was routed is posted again, so it is routed to the screen in front now, as a
terminal that delivered it a moment later would have it.
"""

from __future__ import annotations

from textual import events
from textual.app import App
from textual.screen import Screen

# Keys a widget consumes never come back; only the newest ones are remembered.
REMEMBERED = 256


class KeyRouting:
    """Which screen was in front when each key was routed, until the key comes back."""

    def __init__(self) -> None:
        # id(key) -> (key, screen); the key is held so that its id cannot be reused meanwhile
        self._front: dict[int, tuple[events.Key, Screen]] = {}

    def replayed(self, app: App, event: events.Key) -> bool:
        """Note a key the app takes from the terminal; post again one that came back to a
        different screen in front. True when the key was posted again (drop this one)."""
        if not event.is_forwarded:
            self._front[id(event)] = (event, app.screen)
            while len(self._front) > REMEMBERED:
                del self._front[next(iter(self._front))]
            return False
        key, routed_to = self._front.pop(id(event), (None, None))
        if key is not event or routed_to is app.screen:
            return False
        app.post_message(events.Key(event.key, event.character))
        return True
