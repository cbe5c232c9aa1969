from conftest import run_python


def test_import_does_not_pull_in_tensorflow_under_jax():
    result = run_python(
        """
        import json, sys
        import thumbnet_keras
        from thumbnet_keras import ThumbNetTrainer, backbones, count_flops
        print(json.dumps({"tf": "tensorflow" in sys.modules,
                          "backend": __import__("keras").backend.backend()}))
        """,
        env={"KERAS_BACKEND": "jax"},
    )
    assert result == {"tf": False, "backend": "jax"}
