// Validates a certificate path the way a JVM client does (PKIX, the
// JDK's default), against one trust anchor.
// Usage: java PathCheck.java ROOT.pem LEAF.pem [INTERMEDIATE.pem]
// Prints VALID, or INVALID and the reason.
import java.io.FileInputStream;
import java.security.cert.*;
import java.util.*;

public class PathCheck {
    public static void main(String[] args) throws Exception {
        CertificateFactory cf = CertificateFactory.getInstance("X.509");
        X509Certificate root = load(cf, args[0]);
        List<X509Certificate> path = new ArrayList<>();
        for (int i = 1; i < args.length; i++) {
            path.add(load(cf, args[i]));
        }
        PKIXParameters params = new PKIXParameters(Set.of(new TrustAnchor(root, null)));
        params.setRevocationEnabled(false);
        try {
            CertPathValidator.getInstance("PKIX").validate(cf.generateCertPath(path), params);
            System.out.println("VALID");
        } catch (CertPathValidatorException e) {
            System.out.println("INVALID " + e.getMessage());
        }
    }

    static X509Certificate load(CertificateFactory cf, String file) throws Exception {
        try (FileInputStream in = new FileInputStream(file)) {
            return (X509Certificate) cf.generateCertificate(in);
        }
    }
}
