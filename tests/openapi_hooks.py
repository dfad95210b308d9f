"""schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS): generators for the two request
bodies JSON Schema cannot describe fully. The OpenAPI says what the server accepts (an SDP offer with a fingerprint
that receives video; an image of at least 64x64 pixels) and documents the 400/422 it answers otherwise; these make
the valid bodies, varied, so that positive tests send what a real client sends."""
from __future__ import annotations

import io
import json
import re

import schemathesis
from hypothesis import strategies as st
from PIL import Image

from server.openapi import SDP_OFFER_EXAMPLE


@st.composite
def sdp_offers(draw) -> bytes:
    """The stored aiortc offer with fresh identifiers, ICE credentials and DTLS fingerprint, as every new
    RTCPeerConnection makes them."""
    hex_digits = "0123456789ABCDEF"
    fingerprint = ":".join(draw(st.text(hex_digits, min_size=2, max_size=2)) for _ in range(32))
    ufrag = draw(st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/", min_size=4, max_size=32))
    pwd = draw(st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/", min_size=22, max_size=32))
    session = draw(st.integers(0, 2**62))
    video = draw(st.sampled_from(["recvonly", "sendrecv"]))  # both receive our video
    offer = SDP_OFFER_EXAMPLE
    offer = re.sub(r"o=- \d+ \d+", f"o=- {session} {session}", offer)
    offer = re.sub(r"a=ice-ufrag:\S+", f"a=ice-ufrag:{ufrag}", offer)
    offer = re.sub(r"a=ice-pwd:\S+", f"a=ice-pwd:{pwd}", offer)
    offer = re.sub(r"a=fingerprint:sha-256 \S+", f"a=fingerprint:sha-256 {fingerprint}", offer)
    offer = offer.replace("a=recvonly", f"a={video}", 1)
    if draw(st.booleans()):
        offer = offer.replace("\r\n", "\n")  # some clients end lines with LF alone
    return offer.encode()


@st.composite
def portraits(draw, image_format: str) -> bytes:
    """A real image the model accepts: at least 64x64 pixels."""
    width, height = draw(st.integers(64, 160)), draw(st.integers(64, 160))
    colour = tuple(draw(st.integers(0, 255)) for _ in range(3))
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=image_format)
    return buffer.getvalue()


@schemathesis.serializer("application/sdp")
def sdp_text(ctx: schemathesis.SerializationContext, value: object) -> dict:
    """The schema's example (a string) and generated offers (bytes) go as they are; anything else as its JSON."""
    if isinstance(value, bytes):
        return {"data": value}
    return {"data": (value if isinstance(value, str) else json.dumps(value)).encode("utf-8", "surrogatepass")}


# schemathesis (4.32) refuses a string example for a media type that has a custom strategy ("Serialization not
# possible"), so the served SDP example is taken from the schema as it loads and sent as bytes in the examples phase.
SDP_EXAMPLES: dict[str, str] = {}  # operation label -> the schema's example offer


@schemathesis.hook
def before_load_schema(context: schemathesis.HookContext, raw_schema: dict) -> None:
    for path, item in raw_schema.get("paths", {}).items():
        for method, operation in item.items():
            sdp = operation.get("requestBody", {}).get("content", {}).get("application/sdp", {})
            if "example" in sdp:
                SDP_EXAMPLES[f"{method.upper()} {path}"] = sdp.pop("example")


@schemathesis.hook
def before_add_examples(context: schemathesis.HookContext, examples: list) -> None:
    operation = context.operation
    if operation is not None and operation.label in SDP_EXAMPLES:
        examples.append(operation.Case(body=SDP_EXAMPLES[operation.label].encode(), media_type="application/sdp"))


schemathesis.openapi.media_type("application/sdp", sdp_offers())
schemathesis.openapi.media_type("image/png", portraits("PNG"))
schemathesis.openapi.media_type("image/jpeg", portraits("JPEG"))
schemathesis.openapi.media_type("image/webp", portraits("WEBP"))
