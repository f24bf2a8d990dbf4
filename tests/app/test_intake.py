"""Image intake: the bad-input catalogue through HTTP, and decode_image on its own."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

from app.errors import InvalidImageError, TooLargeError, UnsupportedTypeError
from app.intake import DecodedImage, decode, open_image, sniff_format
from tests.app.support import Server, encode, png_claiming, shapes_image, sixteen_bit_png

JPEG = encode(shapes_image(), "JPEG", quality=90)


def _cmyk_jpeg() -> bytes:
    return encode(shapes_image().convert("CMYK"), "JPEG")


def _rgba_png() -> bytes:
    image = shapes_image().convert("RGBA")
    image.putalpha(200)
    return encode(image, "PNG")


def _palette_png() -> bytes:
    return encode(shapes_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def _post(server: Server, content: bytes, content_type: str = "image/jpeg") -> httpx.Response:
    return httpx.post(
        server.url + "/detect", content=content, headers={"Content-Type": content_type}, timeout=30
    )


# (case, content, declared type, expected status, expected error code or None for 200)
RAW_CASES = [
    ("empty body", b"", "image/jpeg", 400, "invalid_image"),
    ("truncated JPEG", JPEG[: len(JPEG) // 3], "image/jpeg", 400, "invalid_image"),
    ("JPEG header only", JPEG[:3], "image/jpeg", 400, "invalid_image"),
    (
        "text sent as image/jpeg",
        b"hello, this is not an image\n" * 5,
        "image/jpeg",
        415,
        "unsupported_type",
    ),
    ("PNG header claiming 30000x30000", png_claiming(30000, 30000), "image/png", 413, "too_large"),
    (
        "PNG header over SSD_MAX_IMAGE_PIXELS",
        png_claiming(5000, 5000),
        "image/png",
        413,
        "too_large",
    ),
    ("GIF", encode(shapes_image(), "GIF"), "image/gif", 415, "unsupported_type"),
    (
        "GIF declared as image/png",
        encode(shapes_image(), "GIF"),
        "image/png",
        415,
        "unsupported_type",
    ),
    ("TIFF", encode(shapes_image(), "TIFF"), "image/tiff", 415, "unsupported_type"),
    ("16-bit PNG", sixteen_bit_png(), "image/png", 200, None),
    ("CMYK JPEG", _cmyk_jpeg(), "image/jpeg", 200, None),
    ("RGBA PNG", _rgba_png(), "image/png", 200, None),
    ("palette PNG", _palette_png(), "image/png", 200, None),
    ("greyscale JPEG", encode(shapes_image().convert("L"), "JPEG"), "image/jpeg", 200, None),
    ("greyscale PNG", encode(shapes_image().convert("L"), "PNG"), "image/png", 200, None),
    ("WebP", encode(shapes_image(), "WEBP"), "image/webp", 200, None),
    ("BMP", encode(shapes_image(), "BMP"), "image/bmp", 200, None),
    ("JPEG declared as octet-stream", JPEG, "application/octet-stream", 200, None),
]


def _check(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    if code is None:
        assert set(body) == {"detections", "image", "model"}
    else:
        assert set(body) == {"error"}
        assert body["error"]["code"] == code
        assert body["error"]["message"]
        assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [case[1:] for case in RAW_CASES],
    ids=[case[0] for case in RAW_CASES],
)
def test_bad_input_catalogue_raw_body(
    server: Server, content: bytes, content_type: str, status: int, code: str | None
) -> None:
    _check(_post(server, content, content_type), status, code)
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def test_sixteen_bit_png_is_answered_with_its_size(server: Server) -> None:
    response = _post(server, sixteen_bit_png(), "image/png")
    assert response.json()["image"] == {"width": 320, "height": 240}


def test_oversized_body_is_413(server: Server) -> None:
    body = JPEG + b"\0" * (3_000_001 - len(JPEG))  # SSD_MAX_UPLOAD_BYTES is 3000000
    _check(_post(server, body), 413, "too_large")


def test_oversized_chunked_body_without_length_is_413(server: Server) -> None:
    def chunks():
        for _ in range(40):
            yield b"\0" * 100_000

    response = httpx.post(
        server.url + "/detect",
        content=chunks(),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    _check(response, 413, "too_large")


def test_missing_multipart_field_is_422(server: Server) -> None:
    response = httpx.post(
        server.url + "/detect", files={"picture": ("a.jpg", JPEG, "image/jpeg")}, timeout=30
    )
    _check(response, 422, "bad_request")
    assert "'image'" in response.json()["error"]["message"]


def test_text_in_the_image_field_is_422(server: Server) -> None:
    response = httpx.post(
        server.url + "/detect",
        data={"image": "not a file"},
        files={"note": ("note.txt", b"forces multipart", "text/plain")},
        timeout=30,
    )
    _check(response, 422, "bad_request")


def test_form_urlencoded_body_is_judged_by_its_bytes(server: Server) -> None:
    response = httpx.post(server.url + "/detect", data={"image": "not a file"}, timeout=30)
    _check(response, 415, "unsupported_type")


def test_malformed_multipart_is_422(server: Server) -> None:
    response = httpx.post(
        server.url + "/detect",
        content=b"--x\r\nnot a header\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
        timeout=30,
    )
    _check(response, 422, "bad_request")


@pytest.mark.parametrize(
    "query",
    [
        "score_threshold=1.5",
        "score_threshold=-0.1",
        "score_threshold=nan",
        "max_detections=0",
        "max_detections=1001",
        "max_detections=ten",
    ],
)
def test_bad_parameters_are_422(server: Server, query: str) -> None:
    response = httpx.post(
        f"{server.url}/detect?{query}",
        content=JPEG,
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    _check(response, 422, "bad_request")


def test_multipart_upload_of_bad_images(server: Server) -> None:
    cases = [
        (b"", 400, "invalid_image"),
        (b"GIF89a....", 415, "unsupported_type"),
        (png_claiming(30000, 30000), 413, "too_large"),
    ]
    for content, status, code in cases:
        response = httpx.post(
            server.url + "/detect", files={"image": ("x.jpg", content, "image/jpeg")}, timeout=30
        )
        _check(response, status, code)


def test_server_is_healthy_after_the_catalogue(server: Server) -> None:
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    _check(_post(server, JPEG), 200, None)


# ---- open_image and decode on their own ----------------------------------------------------


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Check and decode at full scale (no draft), as the service does for small images."""
    return decode(open_image(data, max_pixels, max_jpeg_scans=100, min_side=0))


def test_sniff_format_judges_by_bytes() -> None:
    assert sniff_format(JPEG) == "JPEG"
    assert sniff_format(encode(shapes_image(), "PNG")) == "PNG"
    assert sniff_format(encode(shapes_image(), "WEBP")) == "WEBP"
    assert sniff_format(encode(shapes_image(), "BMP")) == "BMP"
    assert sniff_format(encode(shapes_image(), "GIF")) is None
    assert sniff_format(b"RIFF\0\0\0\0WAVEfmt ") is None


def test_decode_image_reads_pixel_count_before_decoding() -> None:
    # 30000 x 30000 RGB would need 2.7 GB decoded; the header check refuses it first.
    with pytest.raises(TooLargeError):
        decode_image(png_claiming(30000, 30000), max_pixels=1_000_000)
    with pytest.raises(TooLargeError, match="2000x1000"):
        decode_image(png_claiming(2000, 1000), max_pixels=1_000_000)


def test_decode_image_errors() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"", max_pixels=10**6)
    with pytest.raises(InvalidImageError, match="truncated"):
        decode_image(JPEG[: len(JPEG) // 2], max_pixels=10**6)
    with pytest.raises(UnsupportedTypeError, match="GIF"):
        decode_image(encode(shapes_image(), "GIF"), max_pixels=10**6)


def test_decode_image_applies_exif_orientation() -> None:
    displayed = shapes_image()
    stored = displayed.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, max_pixels=10**6)
    assert decoded.size == displayed.size
    assert decoded.image.size == displayed.size


def test_large_jpeg_is_set_to_decode_at_the_dct_scale_that_still_covers_the_input() -> None:
    big = encode(shapes_image().resize((4800, 3600)), "JPEG")
    opened = open_image(big, max_pixels=10**8, max_jpeg_scans=100, min_side=300)
    assert opened.size == (4800, 3600)
    assert opened.pixels == 600 * 450  # 1/8: both sides still >= 300
    decoded = decode(opened)
    assert decoded.image.size == (600, 450) and decoded.size == (4800, 3600)
    small = open_image(encode(shapes_image(), "JPEG"), 10**8, 100, min_side=300)
    assert small.pixels == 480 * 360  # under 2 x 300 on a side: full scale
    png = open_image(encode(shapes_image().resize((4800, 3600)), "PNG"), 10**8, 100, 300)
    assert png.pixels == 4800 * 3600  # only JPEG has a DCT to scale by


def test_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    progressive = encode(shapes_image(), "JPEG", progressive=True)
    scans = progressive.count(b"\xff\xda")
    assert 2 < scans < 20  # what libjpeg writes
    open_image(progressive, 10**8, max_jpeg_scans=scans, min_side=0)
    with pytest.raises(TooLargeError, match=f"{scans} scans"):
        open_image(progressive, 10**8, max_jpeg_scans=scans - 1, min_side=0)
