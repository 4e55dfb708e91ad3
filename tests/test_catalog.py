import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.catalog import CatalogError, ColumnMap, ImageFetcher, read_catalog
from core.preprocess import ImageError, decode_image, image_to_pixels
from training.data import build_product_set

IMAGE_CFG = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
             "interpolation": "bicubic", "resize_mode": "pad", "fill": [255, 255, 255]}


def test_reads_parquet_with_embedded_image_bytes(catalog_path):
    df, report = read_catalog(catalog_path, limit=50)
    assert report.products == 50 and not report.malformed
    assert {"product_id", "title", "description", "image", "price", "article_type", "base_colour"} <= set(df)
    assert decode_image(df["image"][0]).size == (60, 80)


def test_reads_the_csv_sample_with_relative_image_paths(sample_csv):
    df, report = read_catalog(sample_csv)
    assert report.products == 300
    pixels = build_product_set(df.iloc[:20], IMAGE_CFG, report).pixels
    assert pixels.shape == (20, 32, 32, 3) and pixels.std() > 10  # real photos, not the white fill


def test_reads_jsonl_and_maps_columns(tmp_path, sample_csv):
    src = pd.read_csv(sample_csv, dtype=str).iloc[:10]
    path = tmp_path / "items.jsonl"
    with open(path, "w") as f:
        for _, row in src.iterrows():
            f.write(json.dumps({"sku": row.product_id, "name": row.title,
                                "img": str(sample_csv.parent / row.image_url)}) + "\n")
        f.write("{not json\n")
    columns = ColumnMap(id="sku", title="name", description="", image="img")
    df, report = read_catalog(path, columns)
    assert report.products == 10 and report.malformed[0][0] == 11
    assert df["description"].eq("").all() and df["image"].str.endswith(".jpg").all()


def test_bad_rows_and_images_are_reported_never_dropped_silently(tmp_path, sample_csv):
    src = pd.read_csv(sample_csv, dtype=str)
    good = (sample_csv.parent / src.image_url[0]).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "text.jpg").write_bytes(b"this is not an image")
    (tmp_path / "ok.jpg").write_bytes(good)
    rows = [
        "product_id,title,description,price,image_url",
        "1,Red Shirt,Apparel,10,ok.jpg",
        "2,Blue Shirt,Apparel,oops,truncated.jpg",  # bad price -> NaN, truncated image
        "3,Green Shirt,Apparel,5,text.jpg",
        "4,Black Shirt,Apparel,5,missing.jpg",
        "5,White Shirt,Apparel,5,",  # no image at all
        ",No Id,Apparel,5,ok.jpg",  # empty id
        "6,,,5,ok.jpg",  # no text
        "1,Duplicate,Apparel,5,ok.jpg",
        "7,Too,many,fields,here,x",
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(rows) + "\n")
    df, report = read_catalog(path)
    assert df["product_id"].tolist() == ["1", "2", "3", "4", "5"]
    assert np.isnan(df["price"][1])
    assert len(report.malformed) == 3 and report.duplicates == ["1"] and report.missing_images == 1
    products = build_product_set(df, IMAGE_CFG, report)
    assert products.has_image.tolist() == [True, False, False, False, False]
    assert sorted(pid for pid, _ in report.broken_images) == ["2", "3", "4"]
    assert len(products) == 5  # broken images keep their product, text-only
    assert "3 malformed rows" in report.summary()


def test_missing_catalog_and_missing_id_column_are_clear_errors(tmp_path, sample_csv):
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(tmp_path / "nope.csv")
    with pytest.raises(CatalogError, match="--id-col"):
        read_catalog(sample_csv, ColumnMap(id="sku"))


def test_url_images_fail_clearly_when_unreachable(tmp_path):
    fetch = ImageFetcher(cache_dir=tmp_path, timeout_s=2)
    with pytest.raises(ConnectionError, match="cannot download http://127.0.0.1:9/x.jpg"):
        fetch("http://127.0.0.1:9/x.jpg")


def test_preprocessing_refuses_decompression_bombs_and_keeps_the_whole_photo():
    big = Image.new("RGB", (5000, 5000), "red")
    buf = io.BytesIO()
    big.save(buf, "PNG")
    with pytest.raises(ImageError, match="exceeds"):
        decode_image(buf.getvalue(), max_pixels=1_000_000)
    tall = Image.new("RGB", (60, 80), (0, 0, 0))
    buf = io.BytesIO()
    tall.save(buf, "PNG")
    pixels = image_to_pixels(buf.getvalue(), IMAGE_CFG)
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, 16, 16].max() == pytest.approx(-1.0)  # the photo, centred
    assert pixels[:, 16, 0].min() == pytest.approx(1.0)  # white padding on the sides


@pytest.mark.parametrize("broken_at", [2, 4])
def test_a_csv_with_an_unterminated_quote_accounts_for_every_line(tmp_path, broken_at):
    """`2,"Blue, unterminated,...` used to swallow every line after it into one field, silently."""
    rows = [f'{i},Shirt {i},plain cotton,{i}.jpg' for i in range(1, 5)]
    rows[broken_at - 1] = f'{broken_at},"Blue, unterminated,desc,y.jpg'
    multi_line = '5,Shirt 5,"a description\nover two lines",5.jpg'
    path = tmp_path / "catalog.csv"
    path.write_text("\n".join(["product_id,title,description,image_url", *rows, multi_line]) + "\n")
    df, report = read_catalog(path)
    assert report.rows == len(df) + len(report.malformed) == 5  # every record is a product or reported
    assert [line for line, _ in report.malformed] == [broken_at + 1]  # the file's line number (header = 1)
    assert "quot" in report.malformed[0][1]
    assert sorted(df["product_id"]) == sorted({"1", "2", "3", "4", "5"} - {str(broken_at)})
    assert df.loc[df["product_id"] == "5", "description"].item() == "a description\nover two lines"
