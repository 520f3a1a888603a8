"""``brew.db_input``: read batches from a DB (Caffe2's ``helpers/db_input.py``)."""


def db_input(model, blobs_out, batch_size, db, db_type):
    """CreateDB ``dbreader_<db>`` in the init net, TensorProtosDBInput in the net."""
    dbreader = model.param_init_net.CreateDB([], "dbreader_" + db, db=db, db_type=db_type)
    return model.net.TensorProtosDBInput(dbreader, blobs_out, batch_size=batch_size)
