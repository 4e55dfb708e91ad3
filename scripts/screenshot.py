"""Screenshot of a real search on a running search page (what the README shows).

    make page &   # or python client/app.py ...
    .venv/bin/python scripts/screenshot.py --query "red kurta for women" --out docs/search_page.png
    .venv/bin/python scripts/screenshot.py --image runs/query_photo.jpg --out docs/photo_search.png
"""

from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the running search page")
    p.add_argument("--query", default="red kurta for women", help="what to search for")
    p.add_argument("--image", default="", help="search with this photo instead of --query")
    p.add_argument("--gender", default="", help="optional gender filter")
    p.add_argument("--out", default="docs/search_page.png", help="PNG to write")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(args.url)
        page.wait_for_selector("#status >> text=triton: ok")
        if args.gender:
            page.select_option("select[name=gender]", args.gender)
        if args.image:
            page.set_input_files("#file", args.image)
        else:
            page.fill("#q", args.query)
            page.click("button[type=submit]")
        page.wait_for_selector(".card")
        page.wait_for_function(
            "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
