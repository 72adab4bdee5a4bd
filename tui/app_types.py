"""Typed access to the app's client from any node (screens and dialogs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.dom import DOMNode

if TYPE_CHECKING:
    from edgefleet.tui.client import FleetApi


def fleet_client(node: DOMNode) -> FleetApi:
    from edgefleet.tui.app import EdgeFleetApp

    return cast(EdgeFleetApp, node.app).client
