// What a JDBC application does through the proxy, printed as `name=value` lines that
// tests/e2e/test_jdbc.py checks. Arguments: a JDBC URL (as `tsh db config --format=jdbc`
// prints it).
import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.core.BaseConnection;

public class Probe {
    static void out(String name, Object value) {
        System.out.println(name + "=" + value);
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getString(1);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection c = DriverManager.getConnection(url);
             Connection other = DriverManager.getConnection(url)) {
            DatabaseMetaData md = c.getMetaData();
            out("server_version", md.getDatabaseProductVersion());
            out("user", one(c, "select current_user"));
            out("database", one(c, "select current_database()"));
            out("ssl", one(c, "select ssl from pg_stat_ssl where pid = pg_backend_pid()"));
            int pid = c.unwrap(PGConnection.class).getBackendPID();
            out("pid_matches", one(c, "select pg_backend_pid()").equals(Integer.toString(pid)));

            // Server-side prepared statements: pgjdbc switches to them after 5 executions.
            long sum = 0;
            try (PreparedStatement ps = c.prepareStatement("select ?::int * 2, ?::text")) {
                for (int i = 0; i < 20; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "v" + i);
                    try (ResultSet r = ps.executeQuery()) {
                        r.next();
                        sum += r.getInt(1);
                    }
                }
            }
            out("prepared_sum", sum);

            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.execute("create temp table probe (a int, b text)");
                try (PreparedStatement ps = c.prepareStatement("insert into probe values (?, ?)")) {
                    for (int i = 0; i < 2000; i++) {
                        ps.setInt(1, i);
                        ps.setString(2, "row" + i);
                        ps.addBatch();
                    }
                    out("batch", ps.executeBatch().length);
                }
                s.setFetchSize(100);  // a portal read 100 rows at a time
                int rows = 0;
                try (ResultSet r = s.executeQuery("select a from probe order by a")) {
                    while (r.next()) {
                        rows++;
                    }
                }
                out("cursor_rows", rows);
                try {
                    s.execute("select 1/0");
                } catch (SQLException e) {
                    out("error", e.getSQLState());
                }
                c.rollback();
            }
            c.setAutoCommit(true);

            CopyManager copy = new CopyManager(c.unwrap(BaseConnection.class));
            StringWriter w = new StringWriter();
            out("copy_out_rows", copy.copyOut(
                "copy (select g, md5(g::text) from generate_series(1, 20000) g) to stdout", w));
            out("copy_out_md5", one(c, "select md5('" + w.toString().replace("'", "''") + "')"));
            try (Statement s = c.createStatement()) {
                s.execute("create temp table landing (a int, b text)");
            }
            out("copy_in_rows", copy.copyIn("copy landing from stdin", new StringReader(w.toString())));
            out("copy_in_md5", one(c, "select md5(string_agg(a || E'\\t' || b, E'\\n' order by a) || E'\\n') from landing"));

            // LISTEN/NOTIFY between two sessions; the sender's pid is its real backend pid.
            try (Statement s = c.createStatement()) {
                s.execute("listen probe_channel");
            }
            try (Statement s = other.createStatement()) {
                s.execute("notify probe_channel, 'hello from jdbc'");
            }
            PGNotification[] got = c.unwrap(PGConnection.class).getNotifications(10000);
            out("notify_payload", got == null || got.length == 0 ? "none" : got[0].getParameter());
            out("notify_pid_matches", got != null && got.length > 0
                && got[0].getPID() == other.unwrap(PGConnection.class).getBackendPID());

            // Statement.setQueryTimeout: pgjdbc sends a CancelRequest on a new connection.
            long start = System.nanoTime();
            try (Statement s = c.createStatement()) {
                s.setQueryTimeout(1);
                s.execute("select pg_sleep(30)");
                out("cancel", "not cancelled");
            } catch (SQLException e) {
                out("cancel", e.getSQLState());
            }
            out("cancel_seconds", (System.nanoTime() - start) / 1_000_000_000L);
            out("after_cancel", one(c, "select 'still usable'"));

            int tables = 0;
            try (ResultSet r = md.getTables(null, "pg_catalog", "pg_class", null)) {
                while (r.next()) {
                    tables++;
                }
            }
            out("metadata_tables", tables);
        }
    }
}
